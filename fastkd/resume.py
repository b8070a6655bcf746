"""Continuing a run from a checkpoint: which one, whether it fits, and where training goes on.

`agreed_resume` picks the checkpoint (``run.resume``) the same way on every rank. `resume_into`
checks that it belongs to this run (architecture, class count, loss kind, seed: one line naming
the checkpoint's and the config's values otherwise), loads the student, optimizer, grad scaler
and every RNG, and returns the exact `Position`: completed epochs, steps done in the next one and
the meter's sums of that epoch.

The schedule is per step (``global_step / steps_per_epoch`` epochs of progress). When the steps
per epoch changed (another GPU count, ``data.batch_size`` or ``train.max_steps_per_epoch``), the
run continues at the same fraction of training, never at the old step count against the new
epoch length, and the log says so; a changed ``optim.lr`` becomes the schedule's new peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastkd import checkpoint as ckpt_io
from fastkd.config import Config, to_dict
from fastkd.distributed import DistInfo, ranks_agree
from fastkd.engine import TrainState
from fastkd.errors import CheckpointError, ConfigError
from fastkd.weights import load_failure

log = logging.getLogger("fastkd")


@dataclass(frozen=True)
class Position:
    """Where training continues: after ``epoch`` completed epochs and ``step`` steps of the next.

    ``meter``: that epoch's sums so far (`fastkd.meter.TrainMeter.state_dict`), when ``step`` > 0.
    """

    epoch: int = 0
    step: int = 0
    meter: dict[str, Any] | None = None


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


def check_compatible(saved: dict[str, Any], cfg: Config, classes: list[str], path: Path) -> None:
    """Refuse a checkpoint of another architecture, classes, loss kind or seed, in one line."""
    num_classes = len(classes)
    theirs = saved.get("config") or {}

    def saved_value(section: str, key: str) -> Any:
        return (theirs.get(section) or {}).get(key)

    differences = []
    pairs = [
        ("student.arch", saved_value("student", "arch"), cfg.student.arch),
        ("loss.kind", saved_value("loss", "kind"), cfg.loss.kind),
        ("run.seed", saved_value("run", "seed"), cfg.run.seed),
    ]
    for key, then, now in pairs:
        if then is not None and then != now:
            differences.append(f"{key}={then} (this config: {now})")
    saved_classes = len(saved.get("classes") or [])
    if saved_classes and saved_classes != num_classes:
        differences.append(f"{saved_classes} classes (data.root has {num_classes})")
    elif saved_classes and list(saved["classes"]) != list(classes):
        differing = next((a, b) for a, b in zip(saved["classes"], classes, strict=True) if a != b)
        differences.append(
            f"other class folders (class {differing[0]!r} where data.root has {differing[1]!r})"
        )
    if differences:
        raise CheckpointError(
            f"run.resume: {path} belongs to another run: it has {'; '.join(differences)}. "
            "Resume with the config it was written with (config.yaml in its run folder), or "
            "start this config in a new run.dir"
        )


def _load_states(saved: dict[str, Any], state: TrainState, student: Any, path: Path) -> None:
    """The student's weights, the optimizer's state and the grad scaler's, or one-line errors."""
    try:
        student.load_state_dict(saved["student"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"run.resume: the student weights in {path} do not fit this student "
            f"({load_failure(exc)}); resume with the config the checkpoint was written with"
        ) from None
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"run.resume: the optimizer state in {path} does not fit this optimizer ({exc}); "
            "optim.norm_weight_decay must be what the checkpoint was trained with"
        ) from None
    if saved.get("scheduler"):
        state.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(saved["scaler"])


def saved_steps_per_epoch(saved: dict[str, Any], steps: int) -> int:
    """The steps per epoch the checkpoint was trained with (older checkpoints: from its schedule)."""
    if saved.get("steps_per_epoch"):
        return int(saved["steps_per_epoch"])
    epoch, last = int(saved["epoch"]), (saved.get("scheduler") or {}).get("last_epoch", 0)
    return last // epoch if epoch and last else steps


def continue_schedule(state: TrainState, cfg: Config, global_step: int) -> None:
    """Put the per-step schedule at ``global_step``, with ``optim.lr`` as its peak."""
    scheduler = state.scheduler
    scheduler.base_lrs = [cfg.optim.lr] * len(state.optimizer.param_groups)
    scheduler.last_epoch = global_step
    lrs = [
        base * f(global_step)
        for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(state.optimizer.param_groups, lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, cfg.optim.lr
    scheduler._last_lr = lrs  # noqa: SLF001 - what get_last_lr() returns
    state.global_step = global_step


def _position(saved: dict[str, Any], steps: int, rank: int = 0) -> tuple[Position, bool]:
    """Where ``rank`` continues, and whether the schedule had to be moved (steps per epoch)."""
    epoch, step = int(saved["epoch"]), int(saved.get("step", 0))
    then = saved_steps_per_epoch(saved, steps)
    if then == steps:
        meters = saved.get("meter") if step else None  # one per rank of the saving run
        return Position(epoch, step, meters[rank] if meters else None), False
    new_step = min(steps, round(step * steps / then))
    log.warning(
        "warning: this run has %d steps per epoch, the checkpoint's had %d (another GPU count, "
        "data.batch_size or train.max_steps_per_epoch): the schedule continues at the same point "
        "of training, epoch %d + %d/%d steps (global step %d, was %d)%s",
        steps,
        then,
        epoch,
        new_step,
        steps,
        epoch * steps + new_step,
        int(saved.get("global_step", epoch * then + step)),
        (
            f"; the rest of epoch {epoch + 1} reads this run's batches from {new_step + 1} on, so "
            "some of its images are seen twice or not at all"
            if step
            else ""
        ),
    )
    return Position(epoch, new_step, None), True


def _warn_schedule_changes(saved: dict[str, Any], cfg: Config) -> None:
    """Say so when the config changes the schedule's shape (train.epochs, sched.*) on resume."""
    theirs = saved.get("config") or {}
    then = {"train.epochs": (theirs.get("train") or {}).get("epochs")}
    then.update({f"sched.{k}": v for k, v in (theirs.get("sched") or {}).items()})
    now = {"train.epochs": cfg.train.epochs}
    now.update({f"sched.{k}": v for k, v in to_dict(cfg)["sched"].items()})
    changed = [
        f"{key} {then[key]} -> {value}"
        for key, value in now.items()
        if then.get(key) is not None and then[key] != value
    ]
    if changed:
        log.warning(
            "warning: the schedule changed since the checkpoint (%s): the learning rate "
            "continues on the new schedule from this point",
            ", ".join(changed),
        )


def resume_into(
    state: TrainState,
    student: Any,
    path: Path,
    cfg: Config,
    *,
    classes: list[str],
    steps: int,
    dist: DistInfo,
) -> tuple[Position, float]:
    """Load checkpoint ``path`` into the run; returns its position and the best top-1 so far."""
    saved = ckpt_io.load_checkpoint(path)
    check_compatible(saved, cfg, classes, path)
    _load_states(saved, state, student, path)
    position, moved = _position(saved, steps, dist.rank)
    saved_world = int(saved.get("world_size") or dist.world_size)
    if saved_world != dist.world_size:
        position = Position(position.epoch, position.step)  # the sums were another rank's
        log.warning(
            "warning: the checkpoint was written by %d processes, this run has %d: each rank's "
            "share of the data changes%s, and the ranks without a saved random state start "
            "from rank 0's",
            saved_world,
            dist.world_size,
            f" for the rest of epoch {position.epoch + 1}" if position.step else "",
        )
    _warn_schedule_changes(saved, cfg)
    global_step = position.epoch * steps + position.step
    saved_lr = ((saved.get("config") or {}).get("optim") or {}).get("lr", cfg.optim.lr)
    if moved or saved_lr != cfg.optim.lr:
        if saved_lr != cfg.optim.lr:
            log.warning(
                "warning: optim.lr is %g, the checkpoint's run used %g: the schedule continues "
                "with %g as its peak",
                cfg.optim.lr,
                saved_lr,
                cfg.optim.lr,
            )
        continue_schedule(state, cfg, global_step)
    state.global_step = global_step
    rng = saved.get("rng")
    if rng:
        ckpt_io.restore_rng(rng[dist.rank] if dist.rank < len(rng) else rng[0])
    where = f"epoch {position.epoch}" + (
        f" and step {position.step}/{steps} of epoch {position.epoch + 1}" if position.step else ""
    )
    log.info("resumed from %s after %s (global step %d)", path, where, global_step)
    return position, float(saved.get("best_top1", float("-inf")))


def agree_on_position(position: Position, path: Path | None, dist: DistInfo) -> None:
    """Every rank must continue from the same epoch and step."""
    if not ranks_agree([position.epoch, position.step], dist.device):
        raise ConfigError(
            f"the ranks resume from different positions (rank {dist.rank}: after epoch "
            f"{position.epoch} step {position.step}, from {path or 'nothing'}): each node found "
            "another checkpoint. Put run.dir on a filesystem that every node shares, or pass one "
            "checkpoint as run.resume=PATH"
        )
