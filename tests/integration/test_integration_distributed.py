"""Distributed training of attached adapters: DDP and FSDP2 under torchrun (gloo, 2 CPU processes).

``examples/ddp_train.py`` is launched once per mode with every method; each rank saves its final
adapter, losses, all-reduced bucket sizes and the base state after detach. Oracles independent of
the distributed machinery: one process training on the whole global batch (mean loss), the
adapter's own parameter count, and a freshly built base model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from restoration import assert_untouched, snapshot, warm_up
from shared_fixtures import load_example
from torch.nn.parallel import DistributedDataParallel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_train.py"
DDP_METHODS = ("prefix", "lora", "prompt", "ia3")
FSDP_METHODS = DDP_METHODS
STEPS = 5
TOL = 1e-5
LAUNCH_TIMEOUT = 300  # seconds


example = load_example(EXAMPLE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(script: Path, out: Path, *args: str) -> None:
    """Run ``script`` under ``torch.distributed.run`` with 2 CPU processes; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(script), "--out", str(out), "--steps", str(STEPS), *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


def load_results(out: Path, method: str) -> list[dict[str, Any]]:
    return [torch.load(out / method / f"rank{rank}.pt") for rank in range(2)]


def run_single(out: Path, methods: tuple[str, ...]) -> Path:
    """Train ``methods`` in this process on the whole global batch (the example's ``--mode single``)
    into ``out``: the reference every distributed run must equal."""
    threads = torch.get_num_threads()
    try:
        example.main(["--mode", "single", "--steps", str(STEPS), "--out", str(out), "--method", *methods])
    finally:
        torch.set_num_threads(threads)  # the example sets its own thread count
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, the whole global batch, every method."""
    return run_single(tmp_path_factory.mktemp("single"), DDP_METHODS)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun(EXAMPLE, out, "--mode", "ddp", "--method", *DDP_METHODS)
    return out


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(EXAMPLE, out, "--mode", "fsdp", "--method", *FSDP_METHODS)
    return out


CASES = [("ddp", method) for method in DDP_METHODS] + [("fsdp", method) for method in FSDP_METHODS]


def results(request: pytest.FixtureRequest, mode: str, method: str) -> list[dict[str, Any]]:
    """Both ranks' results of ``method`` from the launch of ``mode`` (the fixture of that name)."""
    return load_results(request.getfixturevalue(mode), method)


def initial_adapter(method: str) -> dict[str, torch.Tensor]:
    handle = example.attach_method(example.build_model(), method)
    return {name: parameter.detach().clone() for name, parameter in handle.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "method"), CASES)
def test_ranks_end_with_identical_adapters(request: pytest.FixtureRequest, mode: str, method: str) -> None:
    first, second = results(request, mode, method)
    assert first["adapter"].keys() == second["adapter"].keys()
    for name, tensor in first["adapter"].items():
        assert torch.equal(tensor, second["adapter"][name]), f"{mode}/{method}: {name} differs between ranks"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "method"), CASES)
def test_two_processes_equal_one_process_on_the_global_batch(
    request: pytest.FixtureRequest, single: Path, mode: str, method: str
) -> None:
    first, second = results(request, mode, method)
    reference = torch.load(single / method / "single.pt")
    start = initial_adapter(method)
    for name, expected in reference["adapter"].items():
        assert (expected - start[name]).abs().max() > 1e-4, f"{method}: {name} did not train; the comparison is void"
        torch.testing.assert_close(first["adapter"][name], expected, rtol=0, atol=TOL, msg=f"{mode}/{method}: {name}")
    rank_mean = (torch.tensor(first["losses"]) + torch.tensor(second["losses"])) / 2  # equal token counts per rank
    torch.testing.assert_close(rank_mean, torch.tensor(reference["losses"]), rtol=0, atol=TOL)
    assert rank_mean[-1] < rank_mean[0], f"{mode}/{method}: the loss did not go down: {rank_mean.tolist()}"


@pytest.mark.slow
@pytest.mark.parametrize("method", DDP_METHODS)
def test_ddp_all_reduces_only_adapter_gradients(ddp: Path, method: str) -> None:
    first, second = load_results(ddp, method)
    adapter_numel = sum(tensor.numel() for tensor in first["adapter"].values())
    base_numel = sum(tensor.numel() for tensor in first["base_after_detach"].values())
    assert first["trainable_numel"] == adapter_numel < base_numel / 10
    for result in (first, second):
        assert len(result["buckets"]) == STEPS
        for step, buckets in enumerate(result["buckets"]):
            assert sum(buckets) == adapter_numel, f"{method}: step {step} all-reduced {buckets}, adapter {adapter_numel}"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "method"), CASES)
def test_detach_while_wrapped_restores_the_base(request: pytest.FixtureRequest, mode: str, method: str) -> None:
    fresh = example.build_model()
    expected = fresh.state_dict()
    for result in results(request, mode, method):
        base = result["base_after_detach"]
        assert base.keys() == expected.keys(), f"{mode}/{method}: adapter keys left: {set(base) - set(expected)}"
        for key, tensor in expected.items():
            assert torch.equal(base[key], tensor), f"{mode}/{method}: base tensor {key} changed"
        assert result["requires_grad_after_detach"] == {name: True for name, _ in fresh.named_parameters()}


@pytest.fixture
def one_process_group(tmp_path: Path) -> Iterator[None]:
    """A gloo group of one process inside pytest (DDP needs a group; nothing is launched)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_detach_under_ddp_leaves_no_trace(one_process_group: None, method: str) -> None:
    model = example.build_model()
    warm_up(model)
    before = snapshot(model)
    handle = example.attach_method(model, method).attach()
    wrapped = DistributedDataParallel(model)
    registered = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert registered == handle.num_trainable_parameters()
    rows = example.global_batch()
    wrapped(input_ids=rows, labels=rows).loss.backward()
    handle.detach()
    del wrapped
    assert_untouched(model, before)
