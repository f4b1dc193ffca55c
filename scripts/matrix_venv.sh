#!/usr/bin/env bash
# Make .venv-<version>: the CPU build of torch first, then this package with its test extras
# on transformers==<version> (the CI matrix legs; `newest` takes the newest release on the index).
# Usage: bash scripts/matrix_venv.sh 5.23.0
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/matrix_venv.sh TRANSFORMERS_VERSION|newest}"
python_bin="${PYTHON:-python3}"
venv=".venv-$version"
if [ ! -x "$venv/bin/python" ]; then
    "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
if [ "$version" = newest ]; then
    # The newest release on the index, even above pyproject's ceiling: only what the self-check
    # needs (the package itself without its pins, its runtime dependencies, no test extras).
    "${pip[@]}" --upgrade transformers "wrapt>=1.16" "safetensors>=0.4"
    "${pip[@]}" --no-deps -e .
else
    "${pip[@]}" "transformers==$version" -e ".[test]"
fi
echo "$venv: transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
