"""Checkpoints: durable atomic saves, validated loads, RNG states and the bare student export.

A fastkd checkpoint is a dict with ``format: "fastkd-checkpoint"``, the completed epoch count, the
student weights (wrapper prefixes stripped, so they load into the plain torchvision model), the
optimizer / scheduler / grad-scaler states, the best top-1 so far and the resolved config.
Version 2 adds what an exact resume needs (written by `fastkd.trainer.Trainer.save_checkpoint`):
``step`` (steps done in the epoch after ``epoch``; 0 at an epoch's end), ``global_step``,
``steps_per_epoch``, ``world_size``, ``rng`` (one `rng_state` per rank), ``meter`` (the epoch's
sums so far, when ``step`` > 0) and ``reason`` (``epoch``, ``timed`` or ``preempted``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from fastkd.errors import CheckpointError
from fastkd.weights import load_failure, strip_wrapper_prefixes

FORMAT = "fastkd-checkpoint"
VERSION = 2  # 2: the position inside an epoch, RNG states, meter sums (1 still loads)


# Errors with which a filesystem refuses to fsync a directory (some network and FUSE mounts):
# the rename is then as durable as that filesystem makes it, and the save still succeeds.
_DIR_FSYNC_REFUSED = {errno.EINVAL, errno.EBADF, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}
# ``.{name}.tmp{pid}``, the temporaries `atomic_save` writes for ``.pt`` files.
_STALE_TEMPORARY = re.compile(r"\..+\.(pt|json)\.tmp[0-9]+")


def _fsync_folder(folder: Path) -> None:
    """fsync ``folder`` so a rename in it is on disk; a filesystem refusing that is no error."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_REFUSED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_REFUSED:
            raise
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` so that ``path`` always holds a complete file.

    The bytes go to ``.{name}.tmp{pid}`` in the same folder, are flushed and fsynced, the
    temporary is renamed over ``path`` (``os.replace``), then the folder is fsynced. Guarantees:

    - until the rename, ``path`` keeps its previous content, complete; the rename switches it to the
      complete new file in one step, so a killed process leaves ``path`` old or new, never torn;
    - once this returns, the new file and its name are on disk (the fsyncs), so a machine crash or
      power loss afterwards loses neither, and one before leaves the old file whole (the data is
      on disk before the rename can be);
    - on an exception (``KeyboardInterrupt`` too) the temporary is removed and the exception
      re-raised, ``path`` untouched. Only a killed process leaves its temporary behind: see
      `remove_stale_temporaries`.

    A filesystem that refuses to fsync a directory (EINVAL, EBADF, EPERM, ENOTSUP) does not fail
    the save; the rename is then as durable as that filesystem makes it.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`atomic_save`'s guarantees for any content: ``write(f)`` fills the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error says more
            tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.{name}.pt.tmp{pid}`` (and ``.json``) files killed `atomic_save` /
    `atomic_write` calls left in ``folder``.

    Only files so named go (``.last.pt.tmp1234``, ``.status.json.tmp77``), nothing else, not recursively. A temporary
    being written right now would go too, so call this before the run's first save (rank 0 at
    start). Returns the removed paths, sorted; a missing folder removes nothing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _STALE_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return sorted(removed)


def make_checkpoint(
    *,
    epoch: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    best_top1: float,
    config: dict[str, Any],
    classes: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to continue a run after ``epoch`` completed epochs."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "epoch": epoch,
        "student": strip_wrapper_prefixes(student.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "best_top1": best_top1,
        "config": config,
        "classes": list(classes),
        **(extra or {}),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a fastkd checkpoint (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files all mean "unusable"
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({load_failure(exc)}); it may be truncated. "
            "Use an earlier checkpoint (best.pt) or start fresh with run.resume=''"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a fastkd training checkpoint (no 'format: {FORMAT}'); "
            "to start from plain weights use student.weights=PATH instead of run.resume"
        )
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path}: written by a newer fastkd (version {ckpt['version']}); upgrade fastkd"
        )
    return ckpt


def export_student(student: torch.nn.Module, path: str | Path) -> None:
    """Save the student's bare state dict, loadable with ``torchvision.models.X().load_state_dict``."""
    state = {k: v.detach().cpu() for k, v in strip_wrapper_prefixes(student.state_dict()).items()}
    atomic_save(state, path)


def rng_state() -> dict[str, Any]:
    """Every global random generator that can shape training, loadable with ``weights_only=True``.

    Python's `random`, NumPy's legacy global generator (cached gaussian included), torch's CPU
    generator, and the CUDA generators of every device when CUDA is initialized (else None: asking
    would initialize it). Only tensors, ints, floats, strings and None, so a checkpoint holding it
    still loads with ``torch.load(..., weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generators `rng_state` captured: the next draws repeat the captured ones.

    Pieces missing or None are left alone; CUDA states are skipped (no error) when this machine's
    CUDA device count differs from the one that captured them.
    """
    if (py := state.get("python")) is not None:
        random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss_next"]))
    if (npy := state.get("numpy")) is not None:
        keys = torch.as_tensor(npy["keys"]).numpy().astype(np.uint32)
        np.random.set_state(
            (npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), npy["cached_gaussian"])
        )
    if (cpu := state.get("torch")) is not None:
        torch.set_rng_state(cpu)
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
