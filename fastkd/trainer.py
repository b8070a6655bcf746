"""A training run: `Trainer.setup` builds it, `Trainer.fit` trains it, `Trainer.close` releases
its loaders, metrics file and profiler (also after a failure), `Trainer.finish` reports it.

``python -m fastkd.train`` (and ``fastkd.quickstart``) call `run`, which is those four steps.
One run trains ``student.arch`` on ``data.root`` with ``loss.kind``: ``ce`` (hard labels: teachers
and baselines), ``kd`` (Hinton) or ``wsld`` (Weighted Soft Label Distillation from a frozen
``teacher``); under torchrun it is data-parallel (DDP). The run folder receives ``config.yaml``,
``metrics.jsonl``, ``last.pt``, ``best.pt``, ``student.pt``, ``summary.json`` and ``status.json``.
The parts come from `fastkd.builders`, the step and evaluation from `fastkd.engine`, resuming from
`fastkd.resume`.

Days-long runs: ``last.pt`` is written at every epoch's end, every ``train.checkpoint_minutes``
inside epochs and when SIGTERM/SIGINT arrives (`fastkd.control`), each time with the exact step,
every RNG and the epoch's meter sums, so ``run.resume=auto`` continues bitwise where the run was.
A non-finite loss ends the run (`fastkd.errors.Diverged`) without writing a checkpoint, and no
checkpoint is ever written from non-finite weights. ``status.json`` says how the run last ended:
``running``, ``preempted`` (exit code 75: resume me), ``diverged`` or ``finished``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastkd import checkpoint as ckpt_io
from fastkd import diagnostics
from fastkd.builders import (
    Models,
    build_loaders,
    build_models,
    build_train_state,
    seed_everything,
)
from fastkd.config import Config, save_config, to_dict
from fastkd.control import Decision, RunControl, StopSignals
from fastkd.data import Loader, prepare_data_root
from fastkd.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    fail_together,
    gather_objects,
    init_distributed,
)
from fastkd.engine import (
    Precision,
    TrainState,
    count_step_flops,
    evaluate,
    measure_peak_flops,
    resolve_precision,
    train_one_epoch,
)
from fastkd.errors import ConfigError, Diverged, Preempted
from fastkd.logging import MetricsWriter, format_duration, require_tensorboard, setup_console
from fastkd.losses import describe_impl
from fastkd.profiling import StepProfiler
from fastkd.resume import Position, agree_on_position, agreed_resume, resume_into

log = logging.getLogger("fastkd")


def run(cfg: Config, dist: DistInfo | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary that is also written to ``run.dir/summary.json``."""
    dist = dist or init_distributed(cfg.train.device, cfg.run.setup_timeout_min)
    setup_console(dist.is_main)
    with StopSignals() as signals:
        trainer = None
        try:
            trainer = Trainer.setup(cfg, dist, signals)
            try:
                trainer.fit()
            finally:
                trainer.close()
            return trainer.finish()
        except BaseException as stop:
            state = {Preempted: "preempted", Diverged: "diverged"}.get(type(stop), "failed")
            saved = trainer.saved if trainer is not None else None
            with contextlib.suppress(Exception):  # the original error says more
                write_status(cfg.run.dir, dist, state, stop, saved)
            raise


def write_status(
    run_dir: str | Path,
    dist: DistInfo,
    state: str,
    stopped: BaseException | None = None,
    saved: Position | None = None,
) -> None:
    """Rank 0: ``run_dir/status.json`` = how the run stands (requeue scripts read ``state``).

    ``saved``: the position last.pt holds, when this run wrote or resumed one.
    """
    if not dist.is_main:
        return
    status: dict[str, Any] = {"state": state, "time": round(time.time(), 3)}
    if stopped is not None:
        message = str(stopped) or type(stopped).__name__
        status.update(exit_code=getattr(stopped, "exit_code", 1), message=message)
    if saved is not None:
        status.update(checkpoint_epoch=saved.epoch, checkpoint_step=saved.step)
    text = json.dumps(status, indent=2) + "\n"
    ckpt_io.atomic_write(Path(run_dir) / "status.json", lambda f: f.write(text.encode()))


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
    control: RunControl
    start: Position = field(default_factory=Position)  # where fit continues
    saved: Position | None = None  # what last.pt holds, once this run wrote or resumed one
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
    def setup(cls, cfg: Config, dist: DistInfo, signals: StopSignals | None = None) -> Trainer:
        """Build every part of a run (a collective under torchrun); resume when asked.

        ``signals``: the SIGTERM/SIGINT requests the run stops for (`run` installs them).
        What is built before a failure (loaders, metrics file, profiler) is released again.
        """
        cfg.validate()  # a config assembled in code gets the checks a loaded one had
        if cfg.train.tensorboard:
            require_tensorboard()  # on every rank, before anything is built: one clear error
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        resume_path = agreed_resume(cfg, dist)
        if dist.is_main:
            save_config(cfg, Path(cfg.run.dir) / "config.yaml")
            for stale in ckpt_io.remove_stale_temporaries(cfg.run.dir):
                log.info("removed %s, a checkpoint write a killed process left unfinished", stale)
        prepare_data_root(cfg.data, dist)  # the synthetic set, when asked, before anyone scans
        precision = resolve_precision(cfg.train.amp, dist.device)
        control = RunControl(dist, signals or StopSignals(), cfg.train.checkpoint_minutes)
        with contextlib.ExitStack() as on_failure:
            trainer = cls._build(cfg, dist, precision, resume_path, control, on_failure)
            on_failure.pop_all()  # built: the trainer owns its loaders, metrics file and profiler
        write_status(cfg.run.dir, dist, "running", saved=trainer.saved)
        return trainer

    @classmethod
    def _build(
        cls,
        cfg: Config,
        dist: DistInfo,
        precision: Precision,
        resume_path: Path | None,
        control: RunControl,
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
        metrics = MetricsWriter(
            cfg.run.dir, enabled=dist.is_main, tensorboard=cfg.train.tensorboard
        )
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
        trainer = cls(
            cfg, dist, precision, train_loader, val_loader, models, state, teacher_eval, control
        )
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
                self.start, self.best_top1 = resume_into(
                    self.state,
                    self.models.student,
                    path,
                    self.cfg,
                    classes=self.train_loader.classes,
                    steps=self.steps,
                    dist=self.dist,
                )
            self.saved = self.start
        agree_on_position(self.start, path, self.dist)

    def fit(self) -> None:
        """The epoch loop: train, evaluate when due, log, checkpoint; stop when told to.

        After each step `RunControl` may ask for a timed checkpoint, a stop (SIGTERM/SIGINT:
        checkpoint, then `Preempted`) or the end of a diverged run (`Diverged`, no checkpoint).
        """
        epochs, self.fit_start = self.cfg.train.epochs, time.perf_counter()
        self.control.signals.defer()  # a signal now ends the run after the step in flight
        for epoch in range(self.start.epoch + 1, epochs + 1):
            first = epoch == self.start.epoch + 1
            start, meter_state = (self.start.step, self.start.meter) if first else (0, None)
            self.train_loader.set_epoch(epoch - 1, start_batch=start)
            stats = train_one_epoch(
                self.state,
                self.train_loader,
                epoch,
                epochs,
                self.steps,
                start=start,
                resume=meter_state,
                after_step=functools.partial(self._after_step, epoch),
            )
            diverged = self.state.meter.nonfinite is not None
            self._act(self.control.at_epoch_end(diverged=diverged), epoch, self.steps)
            record: dict[str, Any] = {"epoch": epoch, **stats, "top1": None, "top5": None}
            improved = False
            if epoch % self.cfg.train.eval_every == 0 or epoch == epochs:
                improved = self.evaluate()
                record.update(top1=self.last_eval["top1"], top5=self.last_eval["top5"])
                record["val_loss"] = self.last_eval["loss"]
            self.state.meter.metrics.write("epoch", **record)
            self.history.append(record)
            _log_epoch(record, epochs)
            self.save_checkpoint(epoch, improved=improved)
            if epoch < epochs and self.control.at_epoch_end().stop:  # asked while evaluating
                raise self._preempted(epoch, 0)
        if self.last_eval is None:  # resumed after the final epoch: evaluate what we have
            self.evaluate()

    def _after_step(self, epoch: int, step: int) -> None:
        diverged = self.state.meter.nonfinite is not None
        self._act(self.control.after_step(diverged=diverged), epoch, step)

    def _act(self, decision: Decision, epoch: int, step: int) -> None:
        """Carry out ``decision`` after ``step`` steps of ``epoch`` (the same on every rank)."""
        if decision.diverged:
            raise self._diverged(epoch - 1, step)
        if decision.stop:
            self.save_checkpoint(epoch - 1, step, reason="preempted")
            raise self._preempted(epoch - 1, step)
        if decision.checkpoint and step < self.steps:  # an epoch's end writes one anyway
            self.save_checkpoint(epoch - 1, step, reason="timed")

    def _where(self, epoch: int, step: int) -> str:
        """Position (``epoch`` completed epochs, ``step`` steps of the next) in words."""
        if step:
            return f"epoch {epoch + 1} step {step}/{self.steps}"
        return f"the end of epoch {epoch}"

    def _preempted(self, epoch: int, step: int) -> Preempted:
        signal_name = self.control.signals.received or "a signal on another rank"
        return Preempted(
            f"stopped by {signal_name}: last.pt holds {self._where(epoch, step)} (global step "
            f"{self.state.global_step}). Continue with the same command and run.resume=auto"
        )

    def _diverged(self, epoch: int, step: int, weights: bool = False) -> Diverged:
        """``epoch``, ``step``: where the run is (completed epochs, steps of the next)."""
        found = self.state.meter.nonfinite
        if found is not None:
            what = f"the loss is not finite at {found.describe(self.steps)}"
        elif weights:
            what = f"the weights are not finite at {self._where(epoch, step)}"
        else:
            what = f"another rank's loss is not finite (by {self._where(epoch, step)})"
        if self.saved is None:
            kept = "no checkpoint was written"
        else:
            kept = f"last.pt ({self._where(self.saved.epoch, self.saved.step)}) was kept"
        return Diverged(
            f"training diverged: {what}; {kept}. Lower optim.lr (now {self.cfg.optim.lr:g}), "
            "lengthen sched.warmup_epochs or check the data, then continue with "
            "run.resume=auto or start afresh in a new run.dir"
        )

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

    def save_checkpoint(
        self, epoch: int, step: int = 0, *, improved: bool = False, reason: str = "epoch"
    ) -> None:
        """Every rank: write last.pt after ``epoch`` completed epochs and ``step`` steps of the
        next (and best.pt when ``improved``) from rank 0, with every rank's RNG states.

        Non-finite weights are never written: the run ends with `Diverged` instead.
        """
        if not self._weights_finite():
            raise self._diverged(epoch, step, weights=True)
        meter = self.state.meter.state_dict() if step else None
        per_rank = gather_objects({"rng": ckpt_io.rng_state(), "meter": meter}, self.dist)
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
                extra={
                    "step": step,
                    "global_step": self.state.global_step,
                    "steps_per_epoch": self.steps,
                    "world_size": self.dist.world_size,
                    "meter": [r["meter"] for r in per_rank] if step else None,
                    "rng": [r["rng"] for r in per_rank],
                    "reason": reason,
                },
            )
            ckpt_io.atomic_save(checkpoint, self.run_dir / "last.pt")
            if improved:
                ckpt_io.atomic_save(checkpoint, self.run_dir / "best.pt")
            self.state.meter.metrics.write(
                "checkpoint", epoch=epoch, step=step, reason=reason, best=improved
            )
            if step:
                log.info("saved last.pt at epoch %d step %d/%d", epoch + 1, step, self.steps)
        barrier()
        self.saved = Position(epoch, step)
        self.control.checkpointed()

    def _weights_finite(self) -> bool:
        """Whether the student's weights, buffers and momentum are finite on every rank."""
        tensors = [t for t in self.models.student.state_dict().values() if t.is_floating_point()]
        for values in self.state.optimizer.state.values():
            tensors += [v for v in values.values() if torch.is_tensor(v) and v.is_floating_point()]
        bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).sum().float()
        return all_reduce_sum(bad).item() == 0

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
            write_status(self.run_dir, self.dist, "finished", saved=self.saved)
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
    described = diagnostics.describe(record)
    log.info(
        "epoch %d/%d done in %s: loss %.4f train-top1 %.4f%s | val top1 %s top5 %s | %.0f img/s",
        record["epoch"],
        epochs,
        format_duration(record["epoch_time_s"]),
        record["loss"],
        record["train_top1"],
        f" ({described})" if described else "",
        _fmt(record["top1"]),
        _fmt(record["top5"]),
        record["img_per_s"],
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # drop NaN
    return sum(values) / len(values) if values else None
