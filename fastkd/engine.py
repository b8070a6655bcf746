"""The training step, evaluation, and their precision / optimizer / schedule / compile wiring.

The epoch loop (`train_one_epoch`) reads: next batch -> `train_step` -> `fastkd.meter.TrainMeter`.
Nothing in it synchronizes with the device except at logging intervals: the meter accumulates
loss terms and accuracy in device tensors and reads them once per interval.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import diagnostics
from fastkd.config import LossConfig, OptimConfig, SchedConfig, TrainConfig
from fastkd.distributed import all_reduce_sum
from fastkd.errors import ConfigError
from fastkd.losses import kd_loss, wsld_ce_terms
from fastkd.meter import SKIPPED, TrainMeter, sync
from fastkd.profiling import StepProfiler

log = logging.getLogger("fastkd")

Objective = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]

# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32), whether fp16 loss scaling is needed, and why it was chosen."""

    name: str
    dtype: torch.dtype | None
    use_scaler: bool
    reason: str = field(default="", compare=False)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls/convolutions natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware: compute capability 8.0 or newer (A100, H100...).

    ``torch.cuda.is_bf16_supported()`` by default also counts emulation and answers True on a
    V100 (sm_70), where bf16 matmuls and convolutions run emulated, far below fp16's speed.
    """
    if torch.version.hip:  # every ROCm GPU torch supports has bf16 units
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """Map ``train.amp`` to a precision: auto = bf16 where the device has it natively, else fp16
    with loss scaling (GPU) / fp32 (CPU). ``Precision.reason`` says why, for the run's log."""
    if amp == "off":
        return Precision("fp32", None, False, "train.amp=off")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        native = cuda_bf16_native(device)
        if amp == "bf16" and not native:
            raise ConfigError(
                f"train.amp=bf16 but {gpu} has no native bf16 (compute capability 8.0+ has it; "
                "older GPUs only emulate it, slowly): use train.amp=fp16 or auto"
            )
        if amp == "bf16":
            return Precision("bf16", torch.bfloat16, False, f"train.amp=bf16 on {gpu}")
        if amp == "auto" and native:
            return Precision("bf16", torch.bfloat16, False, f"train.amp=auto: {gpu} has bf16")
        why = "train.amp=fp16" if amp == "fp16" else f"train.amp=auto: {gpu} has no native bf16"
        return Precision("fp16", torch.float16, True, f"{why}; fp16 with loss scaling")
    if amp == "fp16":
        # CPU fp16 autocast exists but is slow and has no GradScaler benefit; refuse clearly.
        raise ConfigError("train.amp=fp16 is for GPUs; on the CPU use train.amp=bf16, auto or off")
    if amp == "bf16":
        return Precision("bf16", torch.bfloat16, False, "train.amp=bf16")
    if cpu_supports_bf16():
        return Precision("bf16", torch.bfloat16, False, "train.amp=auto: this CPU has bf16 units")
    return Precision(
        "fp32", None, False, "train.amp=auto: this CPU has no bf16 units (AVX512-BF16 or AMX)"
    )


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def _param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """All trainable parameters; without norm_weight_decay, 1-D ones (norm weights, biases) get none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.norm_weight_decay:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _import_apex_fused_sgd() -> type | None:
    try:
        from apex.optimizers import FusedSGD  # type: ignore[import-not-found]
    except ImportError:
        return None
    return FusedSGD


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """SGD per ``optim.*``; the fused implementation per ``optim.fused``. Returns (optimizer, description)."""
    groups = _param_groups(model, cfg)
    common = dict(
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    if cfg.fused == "apex":
        fused_sgd = _import_apex_fused_sgd()
        if fused_sgd is None:
            raise ConfigError(
                "optim.fused=apex but apex is not importable; install NVIDIA apex or use optim.fused=auto"
            )
        if device.type != "cuda":
            raise ConfigError(
                "optim.fused=apex needs a CUDA device; use optim.fused=auto on the CPU"
            )
        return fused_sgd(groups, **common), "apex FusedSGD"
    if cfg.fused in ("auto", "torch"):
        try:
            return torch.optim.SGD(
                groups, fused=True, **common
            ), f"torch SGD (fused, {device.type})"
        except (RuntimeError, TypeError) as exc:
            if cfg.fused == "torch":
                raise ConfigError(
                    f"optim.fused=torch: torch's fused SGD is unavailable here ({exc})"
                ) from None
    return torch.optim.SGD(groups, foreach=device.type == "cuda", **common), "torch SGD (unfused)"


def lr_factor(
    step: int, *, cfg: SchedConfig, base_lr: float, epochs: int, steps_per_epoch: int
) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (schedules are evaluated per step)."""
    t = step / max(1, steps_per_epoch)  # progress in (fractional) epochs
    warm = 1.0
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        warm = cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * t / cfg.warmup_epochs
    if cfg.kind == "step":
        base = cfg.gamma ** sum(1 for m in cfg.milestones if t >= m)
    elif cfg.kind == "cosine":
        span = max(1e-12, epochs - cfg.warmup_epochs)
        progress = min(1.0, max(0.0, (t - cfg.warmup_epochs) / span))
        floor = cfg.min_lr / base_lr
        base = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        base = 1.0
    return base * warm


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedConfig,
    *,
    base_lr: float,
    epochs: int,
    steps_per_epoch: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR implementing `lr_factor`."""

    def factor(step: int) -> float:
        return lr_factor(
            step, cfg=cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------


def build_objective(cfg: LossConfig, *, diagnostics_on: bool = False) -> Objective:
    """``objective(student_logits, teacher_logits, labels) -> (total, terms)`` for ``loss.kind``.

    ``total`` carries the gradient; ``terms`` are detached 0-dim tensors for logging (``loss``
    and ``ce`` always, plus ``kd`` or ``wsld`` and ``wsld_weight`` for distillation).
    ``diagnostics_on`` (distillation only) adds the step's `fastkd.diagnostics` count vector
    under ``diagnostics.COUNTS``, a 1-D tensor that the meter sums rather than averages.
    """
    if cfg.kind == "ce":

        def ce_objective(student_logits, teacher_logits, labels):
            total = F.cross_entropy(
                student_logits.float(), labels, label_smoothing=cfg.label_smoothing
            )
            return total, {"loss": total.detach(), "ce": total.detach()}

        return ce_objective

    if cfg.kind == "kd":

        def kd_objective(student_logits, teacher_logits, labels):
            ce = F.cross_entropy(
                student_logits.float(), labels, label_smoothing=cfg.label_smoothing
            )
            kd = kd_loss(student_logits, teacher_logits, tau=cfg.tau, loss_weight=cfg.loss_weight)
            total = cfg.ce_weight * ce + kd
            logged = {"loss": total.detach(), "ce": ce.detach(), "kd": kd.detach()}
            if diagnostics_on:
                logged[diagnostics.COUNTS] = diagnostics.step_counts(teacher_logits, labels)
            return total, logged

        return kd_objective

    smoothing = cfg.label_smoothing

    def wsld_objective(student_logits, teacher_logits, labels):
        # The fused op computes the hard-label CE with the WSLD term in one pass; with label
        # smoothing it gives the WSLD term alone (its weights w still use the unsmoothed CEs,
        # as the method defines them) and the smoothed CE is computed beside it.
        terms, rows = wsld_ce_terms(
            student_logits,
            teacher_logits,
            labels,
            tau=cfg.tau,
            loss_weight=cfg.loss_weight,
            ce_weight=0.0 if smoothing else cfg.ce_weight,
            impl=cfg.impl,
        )
        total, ce = terms.total, terms.ce
        if smoothing:
            ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=smoothing)
            total = total + cfg.ce_weight * ce if cfg.ce_weight else total
            ce = ce.detach()
        logged = {
            "loss": total.detach(),
            "ce": ce,
            "wsld": terms.wsld,
            "wsld_weight": terms.weight_mean,
        }
        if diagnostics_on:
            logged[diagnostics.COUNTS] = diagnostics.step_counts(teacher_logits, labels, rows)
        return total, logged

    return wsld_objective


# ---------------------------------------------------------------------------------------------
# FLOPs and peak
# ---------------------------------------------------------------------------------------------


def count_step_flops(
    student: nn.Module, teacher: nn.Module | None, image_size: int, device: torch.device
) -> float:
    """FLOPs of one training step per image: teacher forward + student forward and backward.

    Counted with ``torch.utils.flop_counter`` on a 2-image batch of the uncompiled models, in
    fp32, on ``device``; parameters' gradients are cleared afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randn(2, 3, image_size, image_size, device=device)
    was_training = student.training
    # The train-mode forward would fold this random batch into BatchNorm's running statistics.
    buffers = {name: b.clone() for name, b in student.named_buffers()}
    counter = FlopCounterMode(display=False)
    with counter:
        if teacher is not None:
            with torch.no_grad():
                teacher(images)
        student.train()
        student(images).float().sum().backward()
    student.zero_grad(set_to_none=True)
    student.train(was_training)
    with torch.no_grad():
        for name, buffer in student.named_buffers():
            buffer.copy_(buffers[name])
    return counter.get_total_flops() / 2


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Measured FLOP/s of a large ``dtype`` matmul on a CUDA device (the MFU denominator).

    ``dtype`` is the run's autocast dtype (None: fp32, TF32 where allowed), so MFU compares the
    step with the peak of the arithmetic it really uses. None on the CPU.
    """
    if device.type != "cuda":
        return None
    dtype = dtype or torch.float32
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, iters = time.perf_counter(), 10
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a training epoch needs; built once per run by `fastkd.builders.build_train_state`."""

    student: nn.Module  # what the step calls: possibly DDP-wrapped and compiled
    teacher: nn.Module | None  # inference-only, possibly compiled; None for loss.kind=ce
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    cfg: TrainConfig
    meter: TrainMeter
    global_step: int = 0
    optimizer_name: str = ""
    profiler: StepProfiler | None = None  # train.profile.enabled, until its steps are recorded


# The step's phases, in order: named in the profiler's trace and NVTX as ``fastkd/<phase>``.
PHASES = ("teacher", "student_forward", "loss", "backward", "optimizer")
TEACHER, STUDENT_FORWARD, LOSS, BACKWARD, OPTIMIZER = PHASES


@contextlib.contextmanager
def _marked(name: str, *, profiler: bool, nvtx: bool):
    with contextlib.ExitStack() as stack:
        if profiler:
            stack.enter_context(torch.profiler.record_function(name))
        if nvtx:
            stack.enter_context(torch.cuda.nvtx.range(name))
        yield


def _phase_marker(state: TrainState) -> Callable[[str], contextlib.AbstractContextManager]:
    """Context managers naming the step's phases (``fastkd/<phase>``) for torch.profiler (while
    ``train.profile`` records) and NVTX (``train.nvtx``); no-ops otherwise."""
    profiler, nvtx = state.profiler is not None, state.cfg.nvtx
    if not (profiler or nvtx):
        return lambda phase: contextlib.nullcontext()
    return lambda phase: _marked(f"fastkd/{phase}", profiler=profiler, nvtx=nvtx)


def train_step(
    state: TrainState, images: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step: teacher forward (no graph), student forward, loss, backward, update.

    Returns the detached loss terms and the student's logits; nothing here waits for the device.
    """
    device = state.device
    phase = _phase_marker(state)
    if state.cfg.compile and state.cfg.compile_mode in ("reduce-overhead", "max-autotune"):
        # CUDA-graph modes: a new step may overwrite the previous step's graph outputs.
        torch.compiler.cudagraph_mark_step_begin()
    with state.precision.autocast(device):
        teacher_logits = None
        if state.teacher is not None:
            with phase(TEACHER), torch.no_grad():
                teacher_logits = state.teacher(images)
        with phase(STUDENT_FORWARD):
            student_logits = state.student(images)
        with phase(LOSS):
            total, terms = state.objective(student_logits, teacher_logits, labels)
    with phase(BACKWARD):
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(total).backward()
    with phase(OPTIMIZER):
        state.scaler.step(state.optimizer)
        if state.scaler.is_enabled():
            # The scaler lowers its scale exactly when it skipped the step (inf/NaN gradients):
            # counted on the device, read at log lines (fastkd.meter.SKIPPED).
            scale = state.scaler._scale.clone()  # noqa: SLF001 - no public tensor accessor
            state.scaler.update()
            terms = {**terms, SKIPPED: (state.scaler._scale < scale).float()}  # noqa: SLF001
        else:
            state.scaler.update()
        state.scheduler.step()
    return terms, student_logits


def _finish_profile(state: TrainState, epoch: int) -> None:
    """Stop recording and write the profile record: the trace and tables are on disk."""
    sync(state.device)
    profiler, state.profiler = state.profiler, None
    assert profiler is not None
    profiler.close()
    if profiler.result is not None:
        state.meter.metrics.write("profile", epoch=epoch, **profiler.result)


def train_one_epoch(
    state: TrainState,
    loader: Iterable,
    epoch: int,
    epochs: int,
    steps: int,
    *,
    start: int = 0,
    resume: dict[str, Any] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run steps ``start + 1 .. steps`` of an epoch (``loader`` yields exactly those batches);
    returns mean loss terms, train top-1 and img/s.

    ``resume``: the meter's state saved after step ``start``. ``after_step(step)`` runs after
    each step (the trainer's stop / checkpoint decisions; it may raise to end the run there).
    """
    state.student.train()
    meter = state.meter
    meter.start_epoch(epoch, epochs, steps, start, resume)
    batches = iter(loader)
    for step in range(start + 1, steps + 1):
        with meter.waiting():
            batch = next(batches, None)
        if batch is None:  # the loader ended early
            break
        images, labels = batch
        terms, student_logits = train_step(state, images, labels)
        state.global_step += 1
        # Profiled steps and the trace export run slower than training: out of images/sec.
        profiled = state.profiler is not None and state.profiler.step()
        if profiled:
            _finish_profile(state, epoch)
        meter.update(
            terms, student_logits, labels, global_step=state.global_step, excluded=profiled
        )
        if after_step is not None:
            after_step(step)
    if state.profiler is not None:  # the epoch ended before the profiled steps did
        _finish_profile(state, epoch)
    return meter.end_epoch()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` grown to ``size`` rows by repeating its last image, in its memory format."""
    rows = images.shape[0]
    if rows >= size or rows == 0:
        return images
    memory_format = (
        torch.channels_last
        if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    filler = images[-1:].expand(size - rows, *images.shape[1:])
    return torch.cat([images, filler]).contiguous(memory_format=memory_format)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    precision: Precision,
    device: torch.device,
    *,
    pad_to: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 (fractions) and mean CE over every validation image, summed across ranks.

    ``pad_to``: for a compiled ``model``, the batch size every forward gets. A shard's last,
    smaller batch is padded with copies of its last image and the extra logits dropped, so the
    compiled graph never sees a second shape (which would mean a recompile, and a CUDA graph
    per shape under reduce-overhead). Eval-mode networks treat rows independently, so the
    padding changes no result.

    Runs without autograd: no graph is recorded and no activation kept, and a compiled
    ``model`` gets a forward-only (inference) graph. ``no_grad`` rather than ``inference_mode``:
    dynamo guards on whether a tensor is an inference tensor, so batches made outside
    (a loader's buffers) and padded ones made inside would compile the model twice.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, images, loss sum
    for images, labels in loader:
        rows = labels.shape[0]
        if pad_to:
            images = pad_batch(images, pad_to)
        with precision.autocast(device):
            logits = model(images)
        logits = logits[:rows].float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == labels[:, None]
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.any(dim=1).sum()
        totals[2] += labels.shape[0]
        totals[3] += F.cross_entropy(logits, labels, reduction="sum")
    all_reduce_sum(totals)
    top1, top5, count, loss_sum = totals.tolist()
    count_safe = max(1.0, count)
    return {
        "top1": top1 / count_safe,
        "top5": top5 / count_safe,
        "num_images": int(count),
        "loss": loss_sum / count_safe,
    }
