"""Checkpoints: atomic saves, validated loads, and the bare student export.

A fastkd checkpoint is a dict with ``format: "fastkd-checkpoint"``, the completed epoch count, the
student weights (wrapper prefixes stripped, so they load into the plain torchvision model), the
optimizer / scheduler / grad-scaler states, the best top-1 so far and the resolved config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastkd.errors import CheckpointError
from fastkd.models import load_failure, strip_wrapper_prefixes

FORMAT = "fastkd-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a torn file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
