"""torch.distributed setup for torchrun (single- or multi-node DDP) and rank-aware helpers.

A plain ``python -m fastkd.train`` is a world of one and never touches torch.distributed; under
``torchrun`` the usual environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) select
the process group: NCCL on GPUs, Gloo on CPUs.

Setup steps, where ranks may wait for one another for long (rank 0 scanning a data set of millions
of files, a rank downloading weights), talk over a second process group of the same backend whose
timeout is ``run.setup_timeout_min``: `broadcast_from_main`, `agree_on`,
`ranks_agree` and `fail_together`. A slow setup step never trips NCCL's 10-minute timeout, which
stays the watchdog of the training collectives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastkd.errors import ConfigError, PeerSetupError


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


def check_launcher(environ: dict[str, str] | None = None) -> None:
    """Refuse to start as one of several tasks that SLURM launched without torchrun.

    ``srun python -m fastkd.train`` with N tasks starts N processes that each see a world of one
    (no WORLD_SIZE): N independent runs racing on one run.dir. torch.distributed's own launcher
    sets WORLD_SIZE/RANK; so does a wrapper that maps SLURM's variables itself.
    """
    env = os.environ if environ is None else environ
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a job step; a batch script's own shell
    # (one process, even in a job of many tasks) does not have it.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or "1")
    if tasks <= 1 or "WORLD_SIZE" in env:
        return
    raise ConfigError(
        f"started by srun as task {env.get('SLURM_PROCID', '?')} of {tasks} without torchrun: "
        f"that would be {tasks} independent runs writing one run.dir, so nothing was started. "
        "Launch one torchrun per node instead: srun --ntasks-per-node=1 torchrun "
        "--nnodes=$SLURM_NNODES --nproc_per_node=GPUS_PER_NODE --rdzv_backend=c10d "
        "--rdzv_endpoint=HEAD_NODE:29500 -m fastkd.train ... (README: Train on your data)"
    )


_setup_group: Any = None  # the group of long setup waits (see the module docstring)
_control_group: Any = None  # a Gloo group for the per-step stop/checkpoint flags (fastkd.control)


def init_distributed(device_preference: str = "auto", setup_timeout_min: int = 60) -> DistInfo:
    """Join the torchrun process group when launched by torchrun, else a world of one."""
    global _setup_group, _control_group
    check_launcher()
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
        # The default backend: NCCL's timeout is per group, and a Gloo group would need Gloo's
        # own network set-up (GLOO_SOCKET_IFNAME) on clusters where only NCCL is configured.
        _setup_group = dist.new_group(timeout=timedelta(minutes=setup_timeout_min))
        # Host-side flags exchanged every step without touching the GPU (fastkd.control); Gloo
        # uses the rendezvous's TCP store and the hosts' network, as torch's own checkpointing
        # groups do (GLOO_SOCKET_IFNAME picks the interface where the default one is wrong).
        try:
            _control_group = dist.new_group(backend="gloo")
        except RuntimeError as exc:
            raise ConfigError(
                f"rank {rank}: cannot open the Gloo group fastkd uses to agree on stops and "
                f"checkpoints between steps ({exc}); set GLOO_SOCKET_IFNAME to the network "
                "interface the nodes reach each other on (e.g. GLOO_SOCKET_IFNAME=ib0)"
            ) from None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def control_group() -> Any:
    """The Gloo group of `fastkd.control` (None outside torchrun)."""
    return _control_group


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` in a world of one)."""
    if not _distributed(info):
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj, group=_control_group)
    return gathered


def _distributed(info: DistInfo) -> bool:
    return info.enabled and dist.is_available() and dist.is_initialized()


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; others pass anything, e.g. None).

    Over the setup group: the other ranks may wait up to ``run.setup_timeout_min`` for rank 0.
    """
    if not _distributed(info):
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_setup_group)
    return box[0]


def disagreement(views: list[dict[str, Any]]) -> str | None:
    """What the ranks' ``views`` (one mapping per rank, same keys) disagree on, or None."""
    differing = []
    for key in views[0]:
        values = [view.get(key) for view in views]
        if any(value != values[0] for value in values):
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            differing.append(f"{key} ({per_rank})")
    return "; ".join(differing) or None


def agree_on(view: dict[str, Any], info: DistInfo, what: str) -> None:
    """Raise `ConfigError` on every rank unless every rank passed the same ``view``.

    A collective (setup group): every rank calls it at the same point. The error names each
    differing entry with every rank's value.
    """
    if not _distributed(info):
        return
    views: list[Any] = [None] * info.world_size
    dist.all_gather_object(views, view, group=_setup_group)
    problem = disagreement(views)
    if problem is not None:
        raise ConfigError(f"the ranks disagree about {what}: {problem}")


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
    # max of each value, and minus its minimum; a setup step: the setup group's timeout
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=_setup_group)
    highest, lowest = extremes[: len(values)], -extremes[len(values) :]
    return bool(torch.equal(highest, lowest))


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
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=_setup_group)  # may wait for a slow rank
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
    global _setup_group, _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _setup_group = _control_group = None
