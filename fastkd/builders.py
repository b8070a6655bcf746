"""Builders of a run's parts from its `Config`: loaders, models, optimizer state, seeding.

The library half of training: `fastkd.trainer` composes these into a run, and the benchmarks,
``fastkd.eval`` and the tests build exactly what a run builds from the same functions.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastkd.config import Config
from fastkd.data import Loader, LoaderSpec, build_loader, shared_split_indexes
from fastkd.distributed import DistInfo, agree_on, fail_together
from fastkd.engine import (
    Precision,
    TrainState,
    build_objective,
    build_optimizer,
    build_scheduler,
)
from fastkd.logging import MetricsWriter
from fastkd.meter import TrainMeter
from fastkd.models import create_model, fold_batchnorm, load_weights, memory_format


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; pick deterministic or fastest kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def batch_dtype(cfg: Config, device: torch.device, precision: Precision) -> torch.dtype:
    """The loader's output dtype: data.output_dtype, where auto = fp16 on a GPU under AMP."""
    if cfg.data.output_dtype == "float16":
        return torch.float16
    if cfg.data.output_dtype == "auto" and device.type == "cuda" and precision.dtype is not None:
        return torch.float16
    return torch.float32


def loader_specs(
    cfg: Config, dist: DistInfo, precision: Precision
) -> tuple[LoaderSpec, LoaderSpec]:
    """The (train, val) `LoaderSpec` of this rank for ``cfg``."""
    common = dict(
        device=dist.device,
        rank=dist.rank,
        world_size=dist.world_size,
        dtype=batch_dtype(cfg, dist.device, precision),
        channels_last=cfg.train.channels_last,
    )
    train = LoaderSpec(
        cfg.data, "train", seed=cfg.run.seed, max_batches=cfg.train.max_steps_per_epoch, **common
    )
    return train, LoaderSpec(cfg.data, "val", **common)


def build_loaders(cfg: Config, dist: DistInfo, precision: Precision) -> tuple[Loader, Loader]:
    """This rank's training and validation loaders, from one scan of data.root per run.

    The training loader serves exactly the steps of an epoch (``train.max_steps_per_epoch``
    included). Ranks that read different lists, or cut them into different steps, would train on
    overlapping shards or wait for each other at the epoch's end: they stop here instead.
    """
    train_spec, val_spec = loader_specs(cfg, dist, precision)
    indexes = shared_split_indexes(cfg.data, dist)  # one scan per run, on rank 0
    with fail_together(dist, "building the data loaders"):
        train_loader = build_loader(indexes["train"], train_spec)
        val_loader = build_loader(indexes["val"], val_spec)
    digests = indexes["train"].digest()[:16] + indexes["val"].digest()[:16]
    view = {
        "training images": len(indexes["train"]),
        "validation images": len(indexes["val"]),
        "classes": train_loader.num_classes,
        "steps per epoch": len(train_loader),
        "run.seed": cfg.run.seed,
        "file list hash": digests,
    }
    agree_on(
        view, dist, "the data (check data.root and the data.* and train.* overrides of every node)"
    )
    return train_loader, val_loader


def build_teacher(cfg: Config, num_classes: int, device: torch.device) -> tuple[nn.Module, str]:
    """The frozen teacher: loaded weights, eval mode, no gradients, BN folded, channels_last."""
    teacher = create_model(cfg.teacher.arch, num_classes)
    source = load_weights(
        teacher, cfg.teacher.weights, arch=cfg.teacher.arch, num_classes=num_classes, role="teacher"
    )
    teacher.eval().requires_grad_(False)
    if cfg.teacher.fold_bn:
        teacher = fold_batchnorm(teacher)
        teacher.requires_grad_(False)
    return teacher.to(device=device, memory_format=memory_format(cfg.train.channels_last)), source


def maybe_compile(module: nn.Module, cfg: Config) -> nn.Module:
    """``module`` under ``torch.compile`` per ``train.compile`` / ``train.compile_mode``."""
    if not cfg.train.compile:
        return module
    mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    return torch.compile(module, mode=mode)


@dataclass
class Models:
    """The bare networks (whose weights are saved) and the forms the step and evaluation call."""

    student: nn.Module
    teacher: nn.Module | None
    train_model: nn.Module  # student, DDP-wrapped under torchrun, compiled when train.compile
    eval_model: nn.Module  # student, compiled when train.compile (never DDP: ranks evaluate shards)
    teacher_step: nn.Module | None  # teacher, compiled separately when train.compile
    student_source: str
    teacher_source: str


def build_models(cfg: Config, num_classes: int, dist: DistInfo) -> Models:
    """Student (and teacher unless loss.kind=ce) with weights loaded, on the device, wrapped for the step."""
    device = dist.device
    torch.manual_seed(cfg.run.seed)  # identical initial student on every rank
    with fail_together(dist, "loading the models"):  # before DDP's first broadcast
        student = create_model(cfg.student.arch, num_classes)
        student_source = load_weights(
            student,
            cfg.student.weights,
            arch=cfg.student.arch,
            num_classes=num_classes,
            role="student",
        )
        student = student.to(device=device, memory_format=memory_format(cfg.train.channels_last))
        teacher, teacher_source = None, ""
        if cfg.loss.kind != "ce":
            teacher, teacher_source = build_teacher(cfg, num_classes, device)
    if cfg.train.sync_bn and dist.enabled:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    train_model: nn.Module = student
    if dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(
            student, device_ids=device_ids, gradient_as_bucket_view=True
        )
    return Models(
        student=student,
        teacher=teacher,
        train_model=maybe_compile(train_model, cfg),
        eval_model=maybe_compile(student, cfg),
        teacher_step=maybe_compile(teacher, cfg) if teacher is not None else None,
        student_source=student_source,
        teacher_source=teacher_source,
    )


def build_train_state(
    cfg: Config,
    models: Models,
    *,
    dist: DistInfo,
    precision: Precision,
    steps_per_epoch: int,
    metrics: MetricsWriter,
    flops_per_image: float | None = None,
    peak_flops: float | None = None,
) -> TrainState:
    """Optimizer, per-step schedule, grad scaler, objective and meter around ``models``."""
    optimizer, optimizer_name = build_optimizer(models.student, cfg.optim, dist.device)
    if precision.use_scaler and not getattr(optimizer, "_step_supports_amp_scaling", False):
        # GradScaler.step reads the inf check back (.item()) unless the optimizer takes it as a
        # tensor, as torch's fused SGD does: one host synchronization per step.
        warnings.warn(
            f"fp16 loss scaling with {optimizer_name}: the grad scaler synchronizes the host with "
            "the GPU at every step to skip steps with inf/NaN gradients; optim.fused=auto (torch's "
            "fused SGD) checks on the GPU instead",
            stacklevel=2,
        )
    scheduler = build_scheduler(
        optimizer,
        cfg.sched,
        base_lr=cfg.optim.lr,
        epochs=cfg.train.epochs,
        steps_per_epoch=steps_per_epoch,
    )
    objective = build_objective(cfg.loss)
    if cfg.train.compile:
        objective = torch.compile(objective, fullgraph=True)
    meter = TrainMeter(
        metrics,
        optimizer=optimizer,
        dist=dist,
        log_every=cfg.train.log_every,
        compiled=cfg.train.compile,
        flops_per_image=flops_per_image,
        peak_flops=peak_flops,
    )
    return TrainState(
        student=models.train_model,
        teacher=models.teacher_step,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(dist.device.type, enabled=precision.use_scaler),
        precision=precision,
        device=dist.device,
        cfg=cfg.train,
        meter=meter,
        optimizer_name=optimizer_name,
    )
