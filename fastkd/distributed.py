"""torch.distributed setup for torchrun (single- or multi-node DDP) and rank-aware helpers.

A plain ``python -m fastkd.train`` is a world of one and never touches torch.distributed; under
``torchrun`` the usual environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) select
the process group: NCCL on GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastkd.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if preference == "cuda":
        raise ConfigError(
            "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu"
        )
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun, else a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a world of one); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def ranks_agree(values: list[float], device: torch.device) -> bool:
    """Whether every rank passed the same ``values`` (always True in a world of one).

    A collective: every rank must call it, at the same point. For setup decisions each rank makes
    from its own view of the filesystem, so that a disagreement becomes one error on every rank
    instead of ranks that train different epochs and wait for each other forever.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    extremes = torch.cat([mine, -mine])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # max of each value, and minus its minimum
    highest, lowest = extremes[: len(values)], -extremes[len(values) :]
    return bool(torch.equal(highest, lowest))


class PeerSetupError(RuntimeError):
    """Another rank failed a setup step that this rank passed; this rank stops too."""


@contextlib.contextmanager
def fail_together(info: DistInfo, what: str) -> Iterator[None]:
    """Run one setup step on every rank; when it raises on any rank, it raises on all of them.

    Per-node inputs (a data copy on local disk, a weights file) can be missing on one node only.
    Without this, the failing rank exits while the others wait in their next collective until a
    timeout. Here the failing ranks raise their own error and the others `PeerSetupError` naming
    them. The block itself must not call collectives. A no-op in a world of one.
    """
    if not (info.enabled and dist.is_available() and dist.is_initialized()):
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:  # re-raised below, once every rank knows
        failure = exc
    flags = torch.zeros(info.world_size, dtype=torch.float32, device=info.device)
    flags[info.rank] = float(failure is not None)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
    if failure is not None:
        raise failure
    if failed:
        raise PeerSetupError(
            f"rank(s) {', '.join(map(str, failed))} failed while {what} (their error is in their "
            f"output; often a path that exists on some nodes only); rank {info.rank} stops too"
        )


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
