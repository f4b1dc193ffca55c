"""Distributed training of an attached adapter: DDP (or FSDP2, or accelerate) with torchrun, gloo on CPU.

    torchrun --nproc_per_node 2 examples/ddp_train.py --method lora prefix
    torchrun --nproc_per_node 2 examples/ddp_train.py --mode fsdp --method lora prefix prompt ia3
    torchrun --nproc_per_node 2 examples/ddp_train.py --mode accelerate --method lora
    python examples/ddp_train.py --mode single --method lora     # the same global batch in one process

Each process builds the same tiny Llama (a stand-in for your pretrained model), attaches the
adapter, and only then wraps the model. Attach BEFORE wrapping: DDP records the parameters that
require grad when it is constructed, so attaching first means it sees exactly the adapter's
parameters (attach froze the base) and all-reduces only their gradients; a parameter added after
wrapping would never be synchronised, so attaching another adapter means building a new wrapper.
FSDP2's ``fully_shard`` likewise converts the parameters present when it is called (the
adapters read their parameters from the model at every call, so the replaced ones are used).

Every rank trains on its own slice of one global batch; the gradients are averaged over the
ranks, so the result equals one process training on the whole batch (mean loss). At the end the
adapter is detached while the model is still wrapped, which restores the base model exactly.

``accelerate launch --cpu --num_processes 2`` starts several CPU processes only through
``mpirun`` (accelerate's multi-CPU launcher); without it, it silently starts one. ``--mode
accelerate`` under torchrun runs the same training through ``Accelerator.prepare``; on GPUs,
``accelerate launch --multi_gpu --num_processes 2 examples/ddp_train.py --mode accelerate``.

With ``--out DIR`` each rank writes ``DIR/<method>/rank<r>.pt`` (``single.pt`` for one process):
the final adapter tensors, the losses, the element count of every gradient bucket DDP
all-reduced, and the base state after detach; ``tests/integration/test_integration_distributed.py`` checks them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_hooks import (
    Attachment,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)

VOCAB = 96
GLOBAL_BATCH = 4  # rows; split evenly over the ranks
SEQ_LEN = 8
METHODS = ("prefix", "lora", "prompt", "ia3")


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """The tiny base model every rank builds identically (seeded, float32)."""
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def attach_method(model: nn.Module, method: str, seed: int = 1) -> Attachment:
    """Build (not attach) the adapter ``method`` for ``model``; its initial weights depend on ``seed`` only."""
    torch.manual_seed(seed)
    if method == "prefix":
        return attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=4))
    if method == "lora":
        # init_lora_weights=False: B starts non-zero too, so both A and B get gradients from the first step
        return attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    if method == "prompt":
        return attach_prompt(model, PromptTuningConfig(num_virtual_tokens=4))
    if method == "ia3":
        return attach_ia3(model, IA3Config(init_ia3_weights=False))
    raise ValueError(f"method={method!r} is not accepted; expected one of prefix, lora, prompt, ia3")


def global_batch(seed: int = 123) -> torch.Tensor:
    """``input_ids`` (GLOBAL_BATCH, SEQ_LEN), no padding, so every row has the same number of label tokens."""
    return torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


class BucketRecorder:
    """The element count of every gradient bucket DDP all-reduces, one list per step."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def new_step(self) -> None:
        self.steps.append([])


# No annotations on bucket / return: DDP checks them at runtime and would find strings here.
def record_and_allreduce(recorder: BucketRecorder, bucket):
    """DDP communication hook: record the bucket's size, then all-reduce it (mean) as DDP does by default.

    ``bucket``: a ``dist.GradBucket`` (the flat gradients of some parameters); returns a ``Future``."""
    recorder.steps[-1].append(bucket.buffer().numel())
    group = dist.group.WORLD  # the default process group
    assert group is not None
    return default_hooks.allreduce_hook(group, bucket)


def wrap(model: nn.Module, mode: str, recorder: BucketRecorder) -> nn.Module:
    """Wrap the attached ``model`` for ``mode`` (``ddp`` / ``fsdp``); the engine to call."""
    if mode == "ddp":
        ddp = DistributedDataParallel(model)  # CPU: no device_ids; records the params that require grad
        ddp.register_comm_hook(recorder, record_and_allreduce)
        return ddp
    if mode == "fsdp":
        for layer in model.model.layers:  # type: ignore[union-attr]
            fully_shard(layer)  # each decoder layer (its LoRA / IA3 parameters included) is one shard group
        fully_shard(model)  # the rest: embeddings, head, the prefix / prompt encoder registered on the model
        return model
    return model  # single process


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached full copy of ``tensor`` (FSDP2 parameters are sharded ``DTensor``s)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def train(method: str, args: argparse.Namespace, rank: int, world: int, accelerator: Any = None) -> None:
    """Attach ``method``, wrap, train ``args.steps`` steps on this rank's slice, detach; save if ``args.out``."""
    model = build_model()
    handle = attach_method(model, method).attach()  # attach BEFORE wrapping: DDP records parameters now
    trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recorder = BucketRecorder()
    if accelerator is not None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        engine, optimizer = accelerator.prepare(model, optimizer)
        if isinstance(engine, DistributedDataParallel):
            engine.register_comm_hook(recorder, record_and_allreduce)
    else:
        engine = wrap(model, args.mode, recorder)
        # built after wrapping: fully_shard replaces the parameters by DTensors
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    rows = global_batch().chunk(world)[rank]  # (GLOBAL_BATCH / world, SEQ_LEN): this rank's slice
    engine.train()
    losses = []
    for _ in range(args.steps):
        recorder.new_step()
        optimizer.zero_grad()
        loss = engine(input_ids=rows, labels=rows).loss  # mean over this rank's tokens
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()  # DDP all-reduces the adapter's gradients (mean over ranks) here
        optimizer.step()
        losses.append(loss.item())
    if rank == 0:
        print(f"{method}: loss {losses[0]:.4f} -> {losses[-1]:.4f} on rank 0")

    adapter = {name: full(parameter) for name, parameter in handle.named_parameters()}
    handle.detach()  # while still wrapped: the base is restored exactly
    if args.out is not None:
        folder = args.out / method
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "adapter": adapter,
                "losses": losses,
                "buckets": recorder.steps,
                "trainable_numel": trainable_numel,
                "base_after_detach": {key: full(value) for key, value in model.state_dict().items()},
                "requires_grad_after_detach": {key: p.requires_grad for key, p in model.named_parameters()},
                "world_size": world,
            },
            folder / ("single.pt" if world == 1 else f"rank{rank}.pt"),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["lora"], choices=METHODS, help="trained one after another")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=None, help="write OUT/<method>/rank<r>.pt (or single.pt)")
    parser.add_argument(
        "--mode", default="ddp", choices=["ddp", "fsdp", "accelerate", "single"],
        help="ddp: DistributedDataParallel; fsdp: FSDP2 fully_shard; accelerate: Accelerator.prepare; "
        "single: one process on the whole global batch (the reference, run with plain python)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    accelerator = None
    if args.mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # under torchrun: gloo, one CPU process per rank
        rank, world = accelerator.process_index, accelerator.num_processes
    elif args.mode == "single":
        rank, world = 0, 1
    else:
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
        rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise ValueError(f"world size {world} must divide the global batch of {GLOBAL_BATCH}")
    for method in args.method:
        train(method, args, rank, world, accelerator)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
