#!/usr/bin/env bash
# The GPU checks of issue 19 in one run (about 6 minutes on one H100): the CUDA tests, then the GPU
# benchmark table. Meant for a lent GPU machine (see docs/benchmarks.md); CI never runs it.
#
# On the device image (Python 3.12, torch, peft, an older transformers), carry the wheels of a
# transformers in the supported range first, from the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.23.0 wrapt
# and run it with `carry: [".whl"]`:  bash scripts/gpu_check.sh   (results land in $OUT, or ./gpu-results)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' \
    | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
timeout 420 python3 -m benchmarks.gpu --repeats 5 --output "$out/BENCHMARKS_GPU_RUN.md" 2>&1 | tee "$out/gpu_bench.txt"
