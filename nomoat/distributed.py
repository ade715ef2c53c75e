"""Everything that knows about ranks: joining torchrun's process group, wrapping the single-device model in DDP
or FSDP2 from outside, each rank's slice of a global batch, the config check across ranks, and the one-machine
launcher over torchrun. The model and the loop never test for ranks themselves beyond `World.main`.
Not here: checkpoint formats (`checkpoint.py`), the loop (`train.py`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from nomoat.config import TrainConfig
from nomoat.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = World()


def init(device: torch.device) -> World:
    """Join the process group that torchrun describes in the environment; one process needs no group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return ONE_PROCESS
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local_rank)


def local_device(device: torch.device, world: World) -> torch.device:
    """Each process on a machine gets its own GPU; CPU processes share the one CPU device."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" else device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def check_same_config(text: str, world: World) -> None:
    """Ranks launched with different flags would train different models in lockstep; refuse at start."""
    if world.size == 1:
        return
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests: list[str] = [""] * world.size
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise UserError(f"rank {odd[0]} was started with a different config than rank 0; launch every rank alike")


def micro_batches(loader: Iterator[Any], grad_accum: int, world: World) -> list[Any]:
    """This rank's share of one global batch of grad_accum micro-batches.

    Every rank reads all of them and keeps a disjoint, contiguous slice, so the loader's position (and so its
    saved state) is the same on all ranks, and a run resumes on any world size with the same data order."""
    if grad_accum % world.size:
        raise UserError(
            f"train.grad_accum ({grad_accum}) must be a multiple of the number of processes ({world.size}): "
            "the global batch is batch_size x grad_accum sequences whatever the world size"
        )
    every = [next(loader) for _ in range(grad_accum)]
    share = grad_accum // world.size
    return every[world.rank * share : (world.rank + 1) * share]


def _checkpointed(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def parallelize(model: torch.nn.Module, tc: TrainConfig, device: torch.device, world: World) -> torch.nn.Module:
    """Apply, in torchtitan's order, activation checkpointing, per-block compile, then DDP or FSDP2.

    Blocks are changed in place (their forward is wrapped), so parameter names stay those of the plain model."""
    blocks: Sequence[torch.nn.Module] = model.layers  # type: ignore[assignment]
    for block in blocks:
        if tc.activation_checkpointing:
            block.forward = _checkpointed(block.forward)  # type: ignore[method-assign]
        if tc.compile:
            block.compile()
    if world.size == 1:
        return model
    if tc.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if uses_fsdp_precision(tc, device, world):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def uses_fsdp_precision(tc: TrainConfig, device: torch.device, world: World) -> bool:
    """FSDP's bf16 policy replaces autocast; running both would cast twice."""
    return world.size > 1 and tc.parallel == "fsdp" and device.type == "cuda" and tc.dtype in ("auto", "bfloat16")


def set_grad_sync(model: torch.nn.Module, sync: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under a DDP wrapper (FSDP2 shards in place and keeps the module itself)."""
    return getattr(model, "module", model)


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.device.type == "cuda" else dist.ReduceOp.SUM)
        if value.device.type != "cuda":  # gloo has no AVG
            value /= world.size
    return value


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when any rank saw it: a signal that reached one rank stops all at the same step."""
    if world.size == 1:
        return flag
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None  # NCCL: GPU only
    t = torch.tensor([int(flag)], device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over FSDP2's sharded gradients returns a DTensor; logs want the plain number."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def lost_peer(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone, else None (a bug: keep the traceback)."""
    text = str(error)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        isinstance(error, dist.DistError) or "Connection reset by peer" in text or "Connection closed by peer" in text
    ):
        return f"rank {os.environ.get('RANK', '?')}: lost contact with another rank, which stopped first"
    return None


def launch(nproc: int, argv: list[str]) -> None:
    """`nomoat train --nproc N ...`: torchrun on this machine, N processes running `nomoat train ...`.

    A rank that dies stops the job; the error names the rank, as torchrun's own report does at length."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "nomoat", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the root cause; the others were stopped because of it
        if failure.signal_name() not in ("", "<N/A>", None) and failure.exitcode < 0:
            why = f"killed by {failure.signal_name()}"
        else:
            why = f"exit status {failure.exitcode}"
        stopped = "the job stopped, and the checkpoints it saved are intact"
        raise UserError(f"rank {rank} failed ({why}); {stopped}") from None


def from_main(value: Any, world: World) -> Any:
    """Rank 0's value on every rank: decisions one process measures (precision, a time budget's steps) must be
    the same everywhere, or ranks would train differently in lockstep."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
