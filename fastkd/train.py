"""``python -m fastkd.train --config CONFIG.yaml [dotted.key=value ...]``: build everything, train.

One run trains ``student.arch`` on ``data.root`` with ``loss.kind``: ``ce`` (hard labels: teachers
and baselines), ``kd`` (Hinton) or ``wsld`` (Weighted Soft Label Distillation from a frozen
``teacher``). Under torchrun it is data-parallel (DDP). The run folder receives ``config.yaml``,
``metrics.jsonl``, ``last.pt``, ``best.pt``, ``student.pt`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastkd import checkpoint as ckpt_io
from fastkd.config import Config, ConfigError, dump_yaml, load_config, save_config, to_dict
from fastkd.distributed import (
    DistInfo,
    PeerSetupError,
    agree_on,
    barrier,
    cleanup,
    fail_together,
    init_distributed,
    ranks_agree,
    setup_barrier,
)
from fastkd.engine import (
    Precision,
    TrainState,
    build_objective,
    build_optimizer,
    build_scheduler,
    count_step_flops,
    evaluate,
    measure_peak_flops,
    resolve_precision,
    train_one_epoch,
)
from fastkd.logging import MetricsWriter, format_duration, setup_console
from fastkd.losses import describe_impl
from fastkd.models import create_model, fold_batchnorm, load_weights
from fastkd.profiling import StepProfiler

log = logging.getLogger("fastkd")


def user_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean "the user can fix this": printed as one line, exit code 2."""
    from fastkd.checkpoint import CheckpointError
    from fastkd.data import DataError
    from fastkd.models import ModelError

    return (ConfigError, CheckpointError, DataError, ModelError, PeerSetupError)


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


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None; refuses to silently overwrite a finished or started run."""
    run_dir = Path(cfg.run.dir)
    last = run_dir / "last.pt"
    if cfg.run.resume == "auto":
        return last if last.exists() else None
    if cfg.run.resume:
        path = Path(cfg.run.resume)
        if not path.is_file():
            raise ConfigError(f"run.resume={cfg.run.resume}: no such checkpoint file")
        return path
    if last.exists():
        raise ConfigError(
            f"run.dir={run_dir} already holds a run (last.pt). Continue it with run.resume=auto, "
            "or pick a new run.dir; nothing was overwritten"
        )
    return None


def agreed_resume(cfg: Config, dist: DistInfo) -> Path | None:
    """``resolve_resume`` on every rank, checked to agree across ranks before anything starts.

    Each rank looks at run.dir on its own node; when that folder is not on a shared filesystem
    (or a node holds a stale run), ranks would resume differently or some would refuse, leaving
    the others waiting in a collective. Disagreement is one clear error on every rank instead.
    """
    failure: ConfigError | None = None
    try:
        path = resolve_resume(cfg)
    except ConfigError as exc:
        path, failure = None, exc
    outcome = 2 if failure is not None else (1 if path is not None else 0)
    if not ranks_agree([outcome], dist.device):
        mine = f"resumes from {path}" if path is not None else "starts a new run"
        if failure is not None:
            mine = f"refuses to start ({failure})"
        raise ConfigError(
            f"the ranks disagree about run.dir={cfg.run.dir}: rank {dist.rank} {mine}, others do "
            "not. Every node must see the same run.dir: put it on a filesystem that all nodes "
            "share (or clear the stale run on the node that has one)"
        )
    if failure is not None:
        raise failure
    return path


def build_teacher(cfg: Config, num_classes: int, device: torch.device) -> tuple[nn.Module, str]:
    """The frozen teacher: loaded weights, eval mode, no gradients, BN folded, channels_last."""
    if not cfg.teacher.weights:
        raise ConfigError(
            f"teacher.weights is empty but loss.kind={cfg.loss.kind} needs a trained teacher: pass a "
            "state dict / fastkd checkpoint path or torchvision:WEIGHTS_NAME"
        )
    teacher = create_model(cfg.teacher.arch, num_classes)
    source = load_weights(
        teacher, cfg.teacher.weights, arch=cfg.teacher.arch, num_classes=num_classes, role="teacher"
    )
    teacher.eval().requires_grad_(False)
    if cfg.teacher.fold_bn:
        teacher = fold_batchnorm(teacher)
        teacher.requires_grad_(False)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return teacher.to(device=device, memory_format=memory_format), source


def maybe_compile(module: nn.Module, cfg: Config) -> nn.Module:
    if not cfg.train.compile:
        return module
    return torch.compile(
        module, mode=None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
    )


@dataclass
class Models:
    """The bare networks (whose weights are saved) and the forms the step and evaluation call."""

    student: nn.Module
    teacher: nn.Module | None
    train_model: nn.Module  # student, DDP-wrapped under torchrun, compiled when train.compile
    eval_model: (
        nn.Module
    )  # student, compiled when train.compile (never DDP: each rank evaluates its shard)
    teacher_step: nn.Module | None  # teacher, compiled separately when train.compile
    student_source: str
    teacher_source: str


def build_models(cfg: Config, num_classes: int, dist: DistInfo) -> Models:
    """Student (and teacher unless loss.kind=ce) with weights loaded, on the device, wrapped for the step."""
    device = dist.device
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.run.seed)  # identical initial student on every rank
    with fail_together(dist, "loading the models"):  # before DDP's first broadcast
        student = create_model(cfg.student.arch, num_classes)
        student_source = load_weights(
            student, cfg.student.weights, arch=cfg.student.arch, num_classes=num_classes,
            role="student",
        )  # fmt: skip
        student = student.to(device=device, memory_format=memory_format)
        teacher, teacher_source = None, ""
        if cfg.loss.kind != "ce":
            teacher, teacher_source = build_teacher(cfg, num_classes, device)
    if cfg.train.sync_bn and dist.enabled:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    train_model: nn.Module = student
    if dist.enabled:
        train_model = DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
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
    """Optimizer, per-step schedule, grad scaler and objective around ``models``."""
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
    return TrainState(
        student=models.train_model, teacher=models.teacher_step, objective=objective, optimizer=optimizer,
        scheduler=scheduler, scaler=torch.amp.GradScaler(dist.device.type, enabled=precision.use_scaler),
        precision=precision, device=dist.device, dist=dist, metrics=metrics, cfg=cfg.train,
        flops_per_image=flops_per_image, peak_flops=peak_flops, optimizer_name=optimizer_name,
    )  # fmt: skip


def log_recipe(cfg: Config, dist: DistInfo) -> str:
    """Log the global batch, the learning rate per 256 images and the loss implementation.

    Comparing runs across GPU counts starts here: ``optim.lr`` is for the global batch and is
    never rescaled, so the line gives the per-256 value recipes are usually quoted in. A GPU
    run whose build lacks the CUDA kernel warns that the reference loss runs, and how to rebuild.
    Returns the loss description.
    """
    global_batch = cfg.data.batch_size * dist.world_size
    loss = cfg.loss.kind
    if cfg.loss.kind == "wsld":
        try:
            impl, warning = describe_impl(cfg.loss.impl, dist.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if warning:
            warnings.warn(warning, stacklevel=2)
        loss = f"wsld ({impl})"
    if cfg.sched.warmup_epochs >= cfg.train.epochs:
        warnings.warn(
            f"sched.warmup_epochs={cfg.sched.warmup_epochs} is not shorter than train.epochs="
            f"{cfg.train.epochs}: the whole run is warm-up and the lr never reaches optim.lr",
            stacklevel=2,
        )
    log.info(
        "global batch %d (%d per process x %d), lr %.4g = %.4g per 256 images; loss %s",
        global_batch, cfg.data.batch_size, dist.world_size, cfg.optim.lr,
        cfg.optim.lr * 256 / global_batch, loss,
    )  # fmt: skip
    return loss


def batch_dtype(cfg: Config, device: torch.device, precision: Precision) -> torch.dtype:
    """The loader's output dtype: data.output_dtype, where auto = fp16 on a GPU under AMP."""
    if cfg.data.output_dtype == "float16":
        return torch.float16
    if cfg.data.output_dtype == "auto" and device.type == "cuda" and precision.dtype is not None:
        return torch.float16
    return torch.float32


def resume_into(
    state: TrainState, student: nn.Module, path: Path, classes: list[str], steps: int
) -> tuple[int, float]:
    """Load a checkpoint into the student and the optimizer/schedule/scaler; returns (epoch, best top-1)."""
    saved = ckpt_io.load_checkpoint(path)
    if saved.get("classes") and list(saved["classes"]) != list(classes):
        raise ConfigError(f"run.resume: {path} was trained on other classes than this data set's")
    student.load_state_dict(saved["student"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scheduler"):
        state.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(saved["scaler"])
    epoch = int(saved["epoch"])
    state.global_step = epoch * steps
    log.info("resumed from %s after epoch %d", path, epoch)
    return epoch, float(saved.get("best_top1", float("-inf")))


def build_loaders(cfg: Config, dist: DistInfo, precision: Precision) -> tuple[Any, Any]:
    """This rank's training and validation loaders, from one scan of data.root per run.

    The training loader serves exactly the steps of an epoch (``train.max_steps_per_epoch``
    included). Ranks that read different lists, or cut them into different steps, would train on
    overlapping shards or wait for each other at the epoch's end: they stop here instead.
    """
    from fastkd.data import build_train_loader, build_val_loader, shared_split_indexes

    loader_args = dict(
        device=dist.device,
        rank=dist.rank,
        world_size=dist.world_size,
        dtype=batch_dtype(cfg, dist.device, precision),
        channels_last=cfg.train.channels_last,
    )
    indexes = shared_split_indexes(cfg.data, dist)  # one scan per run, on rank 0
    with fail_together(dist, "building the data loaders"):
        train_loader = build_train_loader(
            cfg.data,
            seed=cfg.run.seed,
            max_batches=cfg.train.max_steps_per_epoch,
            index=indexes["train"],
            **loader_args,
        )
        val_loader = build_val_loader(cfg.data, index=indexes["val"], **loader_args)
    agree_on(
        {"training images": len(indexes["train"]), "validation images": len(indexes["val"]),
         "classes": train_loader.num_classes, "steps per epoch": len(train_loader),
         "run.seed": cfg.run.seed,
         "file list hash": indexes["train"].digest()[:16] + indexes["val"].digest()[:16]},
        dist, "the data (check data.root and the data.* and train.* overrides of every node)",
    )  # fmt: skip
    return train_loader, val_loader


def run(cfg: Config, dist: DistInfo | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary that is also written to ``run.dir/summary.json``."""
    from fastkd.data.synthetic import prepare_synthetic

    dist = dist or init_distributed(cfg.train.device, cfg.run.setup_timeout_min)
    setup_console(dist.is_main)
    device = dist.device
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    run_dir = Path(cfg.run.dir)
    resume_path = agreed_resume(cfg, dist)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # Rank 0 generates the synthetic set (when asked) before the others look; on a node with
        # its own disk, shared_split_indexes generates it there (the same files).
        prepare_synthetic(cfg.data)
    setup_barrier(dist)

    precision = resolve_precision(cfg.train.amp, device)
    train_loader, val_loader = build_loaders(cfg, dist, precision)
    num_classes = train_loader.num_classes
    steps = len(train_loader)  # the loader serves exactly the steps of an epoch

    models = build_models(cfg, num_classes, dist)
    student, teacher = models.student, models.teacher
    log.info(
        "fastkd: %s %s -> %s on %s (%d process%s), %s, %d classes, %d train / %d val images per process",
        cfg.loss.kind, cfg.teacher.arch if teacher is not None else "-", cfg.student.arch, device,
        dist.world_size, "es" if dist.world_size > 1 else "", train_loader.backend, num_classes,
        train_loader.num_samples, val_loader.num_samples,
    )  # fmt: skip
    log.info(
        "precision %s (%s), channels_last %s, compile %s",
        precision.name,
        precision.reason,
        cfg.train.channels_last,
        cfg.train.compile,
    )
    log.info(
        "student weights: %s; teacher weights: %s",
        models.student_source,
        models.teacher_source or "-",
    )
    log_recipe(cfg, dist)

    flops_per_image = count_step_flops(student, teacher, cfg.data.image_size, device)
    peak_flops = measure_peak_flops(device, precision.dtype)
    log.info(
        "%.2f GFLOP per image per training step%s", flops_per_image / 1e9,
        f"; measured {precision.name} matmul peak {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "",
    )  # fmt: skip

    teacher_eval = None
    if teacher is not None:
        teacher_eval = evaluate(teacher, val_loader, precision, device)
        log.info("teacher val top-1 %.4f top-5 %.4f", teacher_eval["top1"], teacher_eval["top5"])
        if teacher_eval["top1"] <= 1.5 / num_classes and cfg.teacher.weights != "random":
            log.warning(
                "warning: the teacher is at chance level on this validation set (top-1 %.3f): check "
                "teacher.weights and that its classes match data.root's class folders", teacher_eval["top1"],
            )  # fmt: skip

    metrics = MetricsWriter(run_dir, enabled=dist.is_main)
    state = build_train_state(
        cfg, models, dist=dist, precision=precision, steps_per_epoch=steps, metrics=metrics,
        flops_per_image=flops_per_image, peak_flops=peak_flops,
    )  # fmt: skip
    log.info("optimizer: %s", state.optimizer_name)
    if cfg.train.profile.enabled:
        state.profiler = StepProfiler(
            run_dir / "profile", skip=cfg.train.profile.skip, steps=cfg.train.profile.steps,
            device=device, rank=dist.rank,
        )  # fmt: skip
        log.info(
            "profiling steps %d-%d of the first epoch into %s", cfg.train.profile.skip + 1,
            cfg.train.profile.skip + cfg.train.profile.steps, run_dir / "profile",
        )  # fmt: skip
    start_epoch, best_top1 = 0, float("-inf")
    if resume_path is not None:
        with fail_together(dist, f"loading the checkpoint {resume_path}"):
            start_epoch, best_top1 = resume_into(
                state, student, resume_path, train_loader.classes, steps
            )
    if not ranks_agree([start_epoch], device):
        raise ConfigError(
            f"the ranks resume from different epochs (rank {dist.rank}: after epoch {start_epoch}, "
            f"from {resume_path or 'nothing'}): each node found another checkpoint. Put run.dir on "
            "a filesystem that every node shares, or pass one checkpoint as run.resume=PATH"
        )
    metrics.write(
        "start", world_size=dist.world_size, device=str(device), backend=train_loader.backend,
        precision=precision.name, optimizer=state.optimizer_name, num_classes=num_classes,
        steps_per_epoch=steps, flops_per_image=flops_per_image, peak_flops=peak_flops,
        resumed_from=str(resume_path or ""), teacher_top1=teacher_eval["top1"] if teacher_eval else None,
    )  # fmt: skip

    # A compiled student sees one batch shape in evaluation too (see engine.evaluate).
    eval_pad = val_loader.batch_size if cfg.train.compile else None
    history: list[dict[str, Any]] = []
    last_eval: dict[str, Any] | None = None
    run_start = time.perf_counter()
    try:
        for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
            train_loader.set_epoch(epoch - 1)
            stats = train_one_epoch(state, train_loader, epoch, cfg.train.epochs, steps)
            record: dict[str, Any] = {"epoch": epoch, **stats, "top1": None, "top5": None}
            improved = False
            if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
                last_eval = evaluate(
                    models.eval_model, val_loader, precision, device, pad_to=eval_pad
                )
                record.update(
                    top1=last_eval["top1"], top5=last_eval["top5"], val_loss=last_eval["loss"]
                )
                improved = last_eval["top1"] > best_top1
                best_top1 = max(best_top1, last_eval["top1"])
            metrics.write("epoch", **record)
            history.append(record)
            log.info(
                "epoch %d/%d done in %s: loss %.4f train-top1 %.4f | val top1 %s top5 %s | %.0f img/s",
                epoch, cfg.train.epochs, format_duration(stats["epoch_time_s"]), stats["loss"],
                stats["train_top1"], _fmt(record["top1"]), _fmt(record["top5"]), stats["img_per_s"],
            )  # fmt: skip
            if dist.is_main:
                checkpoint = ckpt_io.make_checkpoint(
                    epoch=epoch, student=student, optimizer=state.optimizer, scheduler=state.scheduler,
                    scaler=state.scaler, best_top1=best_top1, config=to_dict(cfg), classes=train_loader.classes,
                )  # fmt: skip
                ckpt_io.atomic_save(checkpoint, run_dir / "last.pt")
                if improved:
                    ckpt_io.atomic_save(checkpoint, run_dir / "best.pt")
            barrier()
        if last_eval is None:  # resumed after the final epoch: evaluate what we have
            last_eval = evaluate(models.eval_model, val_loader, precision, device, pad_to=eval_pad)
            best_top1 = max(best_top1, last_eval["top1"])
    finally:
        if state.profiler is not None:  # interrupted while profiling: stop the profiler
            state.profiler.close()
        metrics.close()
        train_loader.close()
        val_loader.close()

    summary = {
        "run_dir": str(run_dir),
        "loss": cfg.loss.kind,
        "student_arch": cfg.student.arch,
        "teacher_arch": cfg.teacher.arch if teacher is not None else None,
        "teacher_weights": models.teacher_source or None,
        "teacher_top1": teacher_eval["top1"] if teacher_eval else None,
        "top1": last_eval["top1"],
        "top5": last_eval["top5"],
        "best_top1": best_top1,
        "num_val_images": last_eval["num_images"],
        "epochs": cfg.train.epochs,
        "img_per_s": _mean([h["img_per_s"] for h in history]),
        "train_time_s": time.perf_counter() - run_start,
        "compile_time_s": state.compile_time_s,
        "flops_per_image": flops_per_image,
        "device": str(device),
        "world_size": dist.world_size,
        "backend": train_loader.backend,
        "precision": precision.name,
        "optimizer": state.optimizer_name,
        "num_classes": num_classes,
        "classes": list(train_loader.classes),
    }
    if dist.is_main:
        ckpt_io.export_student(student, run_dir / "student.pt")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info(
            "done: top-1 %.4f (best %.4f), top-5 %.4f, %.0f img/s; run folder %s",
            summary["top1"], best_top1, summary["top5"], summary["img_per_s"] or 0.0, run_dir,
        )  # fmt: skip
    barrier()
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # drop NaN
    return sum(values) / len(values) if values else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.train",
        description="Train a student (WSLD / KD / CE) from a YAML config. Keys: python -m fastkd.config",
    )
    parser.add_argument("--config", required=True, help="YAML config file (may use _base_: [...])")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=0.2"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user mistakes print one ``fastkd: error:`` line and return 2."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(to_dict(cfg)), end="")
            return 0
        run(cfg)
    except user_errors() as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
