"""A training run: `Trainer.setup` builds it, `Trainer.fit` trains it, `Trainer.close` releases
its loaders, metrics file and profiler (also after a failure), `Trainer.finish` reports it.

``python -m fastkd.train`` (and ``fastkd.quickstart``) call `run`, which is those four steps.
One run trains ``student.arch`` on ``data.root`` with ``loss.kind``: ``ce`` (hard labels: teachers
and baselines), ``kd`` (Hinton) or ``wsld`` (Weighted Soft Label Distillation from a frozen
``teacher``); under torchrun it is data-parallel (DDP). The run folder receives ``config.yaml``,
``metrics.jsonl``, ``last.pt``, ``best.pt``, ``student.pt`` and ``summary.json``. The parts come
from `fastkd.builders`, the step and evaluation from `fastkd.engine`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastkd import checkpoint as ckpt_io
from fastkd.builders import (
    Models,
    build_loaders,
    build_models,
    build_train_state,
    seed_everything,
)
from fastkd.config import Config, save_config, to_dict
from fastkd.data import Loader, prepare_data_root
from fastkd.distributed import DistInfo, barrier, fail_together, init_distributed, ranks_agree
from fastkd.engine import (
    Precision,
    TrainState,
    count_step_flops,
    evaluate,
    measure_peak_flops,
    resolve_precision,
    train_one_epoch,
)
from fastkd.errors import ConfigError
from fastkd.logging import MetricsWriter, format_duration, setup_console
from fastkd.losses import describe_impl
from fastkd.profiling import StepProfiler

log = logging.getLogger("fastkd")


def run(cfg: Config, dist: DistInfo | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary that is also written to ``run.dir/summary.json``."""
    dist = dist or init_distributed(cfg.train.device, cfg.run.setup_timeout_min)
    setup_console(dist.is_main)
    trainer = Trainer.setup(cfg, dist)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.finish()


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
    per_256 = cfg.optim.lr * 256 / global_batch
    log.info(
        "global batch %d (%d per process x %d), lr %.4g = %.4g per 256 images; loss %s",
        global_batch,
        cfg.data.batch_size,
        dist.world_size,
        cfg.optim.lr,
        per_256,
        loss,
    )
    return loss


def resume_into(
    state: TrainState, student: Any, path: Path, classes: list[str], steps: int
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


@dataclass
class Trainer:
    """One run's parts and progress; see the module docstring for its three steps."""

    cfg: Config
    dist: DistInfo
    precision: Precision
    train_loader: Loader
    val_loader: Loader
    models: Models
    state: TrainState
    teacher_eval: dict[str, Any] | None
    start_epoch: int = 0
    best_top1: float = float("-inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None
    fit_start: float | None = None  # perf_counter() when fit began

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def steps(self) -> int:
        return len(self.train_loader)  # the loader serves exactly the steps of an epoch

    @classmethod
    def setup(cls, cfg: Config, dist: DistInfo) -> Trainer:
        """Build every part of a run (a collective under torchrun); resume when asked.

        What is built before a failure (loaders, metrics file, profiler) is released again.
        """
        cfg.validate()  # a config assembled in code gets the checks a loaded one had
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        resume_path = agreed_resume(cfg, dist)
        if dist.is_main:
            save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        prepare_data_root(cfg.data, dist)  # the synthetic set, when asked, before anyone scans
        precision = resolve_precision(cfg.train.amp, dist.device)
        with contextlib.ExitStack() as on_failure:
            trainer = cls._build(cfg, dist, precision, resume_path, on_failure)
            on_failure.pop_all()  # built: the trainer owns its loaders, metrics file and profiler
        return trainer

    @classmethod
    def _build(
        cls,
        cfg: Config,
        dist: DistInfo,
        precision: Precision,
        resume_path: Path | None,
        on_failure: contextlib.ExitStack,
    ) -> Trainer:
        """`setup`'s parts that hold resources, each registering its release on ``on_failure``."""
        train_loader, val_loader = build_loaders(cfg, dist, precision)
        on_failure.callback(train_loader.close)
        on_failure.callback(val_loader.close)
        models = build_models(cfg, train_loader.num_classes, dist)
        _log_setup(cfg, dist, precision, models, train_loader, val_loader)
        flops_per_image = count_step_flops(
            models.student, models.teacher, cfg.data.image_size, dist.device
        )
        peak_flops = measure_peak_flops(dist.device, precision.dtype)
        _log_flops(flops_per_image, peak_flops, precision)
        teacher_eval = _evaluate_teacher(cfg, models, val_loader, precision, dist)
        metrics = MetricsWriter(cfg.run.dir, enabled=dist.is_main)
        on_failure.callback(metrics.close)
        state = build_train_state(
            cfg,
            models,
            dist=dist,
            precision=precision,
            steps_per_epoch=len(train_loader),
            metrics=metrics,
            flops_per_image=flops_per_image,
            peak_flops=peak_flops,
        )
        log.info("optimizer: %s", state.optimizer_name)
        state.profiler = _build_profiler(cfg, dist)
        if state.profiler is not None:
            on_failure.callback(state.profiler.close)
        trainer = cls(cfg, dist, precision, train_loader, val_loader, models, state, teacher_eval)
        trainer.resume(resume_path)
        metrics.write(
            "start",
            world_size=dist.world_size,
            device=str(dist.device),
            backend=train_loader.backend,
            precision=precision.name,
            optimizer=state.optimizer_name,
            num_classes=train_loader.num_classes,
            steps_per_epoch=trainer.steps,
            flops_per_image=flops_per_image,
            peak_flops=peak_flops,
            resumed_from=str(resume_path or ""),
            teacher_top1=teacher_eval["top1"] if teacher_eval else None,
        )
        return trainer

    def resume(self, path: Path | None) -> None:
        """Continue from checkpoint ``path`` (None: a fresh run); every rank must agree."""
        if path is not None:
            with fail_together(self.dist, f"loading the checkpoint {path}"):
                self.start_epoch, self.best_top1 = resume_into(
                    self.state, self.models.student, path, self.train_loader.classes, self.steps
                )
        if not ranks_agree([self.start_epoch], self.dist.device):
            raise ConfigError(
                f"the ranks resume from different epochs (rank {self.dist.rank}: after epoch "
                f"{self.start_epoch}, from {path or 'nothing'}): each node found another "
                "checkpoint. Put run.dir on a filesystem that every node shares, or pass one "
                "checkpoint as run.resume=PATH"
            )

    def fit(self) -> None:
        """The epoch loop: train, evaluate when due, log, checkpoint."""
        epochs, self.fit_start = self.cfg.train.epochs, time.perf_counter()
        for epoch in range(self.start_epoch + 1, epochs + 1):
            self.train_loader.set_epoch(epoch - 1)
            stats = train_one_epoch(self.state, self.train_loader, epoch, epochs, self.steps)
            record: dict[str, Any] = {"epoch": epoch, **stats, "top1": None, "top5": None}
            improved = False
            if epoch % self.cfg.train.eval_every == 0 or epoch == epochs:
                improved = self.evaluate()
                record.update(top1=self.last_eval["top1"], top5=self.last_eval["top5"])
                record["val_loss"] = self.last_eval["loss"]
            self.state.meter.metrics.write("epoch", **record)
            self.history.append(record)
            _log_epoch(record, epochs)
            self.save_checkpoint(epoch, improved)
        if self.last_eval is None:  # resumed after the final epoch: evaluate what we have
            self.evaluate()

    def evaluate(self) -> bool:
        """Evaluate the student on the validation set; True when its top-1 is a new best."""
        # A compiled student sees one batch shape in evaluation too (see engine.evaluate).
        pad_to = self.val_loader.batch_size if self.cfg.train.compile else None
        self.last_eval = evaluate(
            self.models.eval_model, self.val_loader, self.precision, self.dist.device, pad_to=pad_to
        )
        improved = self.last_eval["top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, self.last_eval["top1"])
        return improved

    def save_checkpoint(self, epoch: int, improved: bool) -> None:
        """Rank 0 writes last.pt (and best.pt when ``improved``); every rank waits for it."""
        if self.dist.is_main:
            checkpoint = ckpt_io.make_checkpoint(
                epoch=epoch,
                student=self.models.student,
                optimizer=self.state.optimizer,
                scheduler=self.state.scheduler,
                scaler=self.state.scaler,
                best_top1=self.best_top1,
                config=to_dict(self.cfg),
                classes=self.train_loader.classes,
            )
            ckpt_io.atomic_save(checkpoint, self.run_dir / "last.pt")
            if improved:
                ckpt_io.atomic_save(checkpoint, self.run_dir / "best.pt")
        barrier()

    def close(self) -> None:
        """Stop the profiler (if interrupted while recording), the metrics file and the loaders."""
        if self.state.profiler is not None:
            self.state.profiler.close()
        self.state.meter.metrics.close()
        self.train_loader.close()
        self.val_loader.close()

    def finish(self) -> dict[str, Any]:
        """Write summary.json and student.pt (rank 0) after `fit` and `close`; returns the summary."""
        assert self.last_eval is not None and self.fit_start is not None
        summary = self.summary(train_time_s=time.perf_counter() - self.fit_start)
        if self.dist.is_main:
            ckpt_io.export_student(self.models.student, self.run_dir / "student.pt")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.info(
                "done: top-1 %.4f (best %.4f), top-5 %.4f, %.0f img/s; run folder %s",
                summary["top1"],
                self.best_top1,
                summary["top5"],
                summary["img_per_s"] or 0.0,
                self.run_dir,
            )
        barrier()
        return summary

    def summary(self, train_time_s: float) -> dict[str, Any]:
        """The run's result as summary.json holds it."""
        cfg, teacher, last_eval = self.cfg, self.models.teacher, self.last_eval
        assert last_eval is not None
        return {
            "run_dir": str(self.run_dir),
            "loss": cfg.loss.kind,
            "student_arch": cfg.student.arch,
            "teacher_arch": cfg.teacher.arch if teacher is not None else None,
            "teacher_weights": self.models.teacher_source or None,
            "teacher_top1": self.teacher_eval["top1"] if self.teacher_eval else None,
            "top1": last_eval["top1"],
            "top5": last_eval["top5"],
            "best_top1": self.best_top1,
            "num_val_images": last_eval["num_images"],
            "epochs": cfg.train.epochs,
            "img_per_s": _mean([h["img_per_s"] for h in self.history]),
            "train_time_s": train_time_s,
            "compile_time_s": self.state.meter.compile_time_s,
            "flops_per_image": self.state.meter.flops_per_image,
            "device": str(self.dist.device),
            "world_size": self.dist.world_size,
            "backend": self.train_loader.backend,
            "precision": self.precision.name,
            "optimizer": self.state.optimizer_name,
            "num_classes": self.train_loader.num_classes,
            "classes": list(self.train_loader.classes),
        }


def _log_setup(
    cfg: Config,
    dist: DistInfo,
    precision: Precision,
    models: Models,
    train_loader: Loader,
    val_loader: Loader,
) -> None:
    teacher_arch = cfg.teacher.arch if models.teacher is not None else "-"
    log.info(
        "fastkd: %s %s -> %s on %s (%d process%s), %s, %d classes, %d train / %d val images per "
        "process",
        cfg.loss.kind,
        teacher_arch,
        cfg.student.arch,
        dist.device,
        dist.world_size,
        "es" if dist.world_size > 1 else "",
        train_loader.backend,
        train_loader.num_classes,
        train_loader.num_samples,
        val_loader.num_samples,
    )
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


def _log_flops(flops_per_image: float, peak_flops: float | None, precision: Precision) -> None:
    peak = ""
    if peak_flops:
        peak = f"; measured {precision.name} matmul peak {peak_flops / 1e12:.0f} TFLOP/s"
    log.info("%.2f GFLOP per image per training step%s", flops_per_image / 1e9, peak)


def _build_profiler(cfg: Config, dist: DistInfo) -> StepProfiler | None:
    if not cfg.train.profile.enabled:
        return None
    out_dir = Path(cfg.run.dir) / "profile"
    skip, steps = cfg.train.profile.skip, cfg.train.profile.steps
    log.info("profiling steps %d-%d of the first epoch into %s", skip + 1, skip + steps, out_dir)
    return StepProfiler(out_dir, skip=skip, steps=steps, device=dist.device, rank=dist.rank)


def _evaluate_teacher(
    cfg: Config, models: Models, val_loader: Loader, precision: Precision, dist: DistInfo
) -> dict[str, Any] | None:
    """The teacher's validation accuracy (a wrong teacher shows here, before training)."""
    if models.teacher is None:
        return None
    result = evaluate(models.teacher, val_loader, precision, dist.device)
    log.info("teacher val top-1 %.4f top-5 %.4f", result["top1"], result["top5"])
    if result["top1"] <= 1.5 / val_loader.num_classes and cfg.teacher.weights != "random":
        log.warning(
            "warning: the teacher is at chance level on this validation set (top-1 %.3f): check "
            "teacher.weights and that its classes match data.root's class folders",
            result["top1"],
        )
    return result


def _log_epoch(record: dict[str, Any], epochs: int) -> None:
    log.info(
        "epoch %d/%d done in %s: loss %.4f train-top1 %.4f | val top1 %s top5 %s | %.0f img/s",
        record["epoch"],
        epochs,
        format_duration(record["epoch_time_s"]),
        record["loss"],
        record["train_top1"],
        _fmt(record["top1"]),
        _fmt(record["top5"]),
        record["img_per_s"],
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # drop NaN
    return sum(values) / len(values) if values else None
