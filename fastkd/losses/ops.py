"""The fused WSLD ops (``torch.ops.fastkd.*``, built from kernels/ into ``fastkd._C``).

Importing ``fastkd._C`` registers the op schemas, their CPU/CUDA kernels and, for the Autograd
dispatch key, the autograd formula of the two forward ops (a C++ ``torch::autograd::Function``
whose backward is itself one fused op, so eager training runs both directions without entering
Python). This module adds the rest of what PyTorch needs, as pytorch/extension-cpp does: a fake
(meta) implementation of every op, so that ``torch.compile`` traces shapes without running
kernels (AOTAutograd traces the C++ formula through the dispatcher).

Ops (all take logits of shape (N, C) and integer labels of shape (N,)):

* ``wsld(s, t, labels, tau, loss_weight) -> (loss, row_stats)``
* ``wsld_ce(s, t, labels, tau, loss_weight, ce_weight)
  -> (total, ce, wsld, weight_mean, row_stats)``
* ``wsld_backward(grad, s, t, labels, row_stats, tau, loss_weight, ce_weight) -> grad_student``

``row_stats`` (N, 8) holds per row: the maxima of s and t, the reciprocal partition sums of s/tau,
t/tau and s, w_i, the soft cross-entropy and the student's hard-label cross-entropy; the
backward op recomputes q, p and softmax(s) from them instead of saving N x C probabilities.

When ``fastkd._C`` is missing (not built, or built against another torch) this module warns once
at import and ``fused_available`` returns False everywhere, so ``impl="auto"`` falls back to the
reference implementation.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "BUILD_COMMAND",
    "NUM_STATS",
    "OP_NAMES",
    "check_inputs",
    "check_tau",
    "extension",
    "fused_available",
]

BUILD_COMMAND = "pip install --no-build-isolation -e ."
OP_NAMES = ("fastkd::wsld", "fastkd::wsld_ce", "fastkd::wsld_backward")
NUM_STATS = 8  # columns of row_stats (kernels/wsld.h: StatsColumn)
# The columns fastkd.losses.WSLDRows reads (kernels/wsld.h: kTeacherMax, kWeight, ...).
STATS_TEACHER_MAX, STATS_WEIGHT, STATS_SOFT_CE, STATS_STUDENT_CE = 1, 5, 6, 7

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _load_extension() -> ModuleType | None:
    """Import ``fastkd._C`` (which registers the ops), or warn once and return None."""
    try:
        from fastkd import _C
    except (ImportError, OSError) as error:
        warnings.warn(
            f"fastkd._C is not available ({error}); the WSLD loss uses the slower reference "
            f"PyTorch implementation. Build the fused kernels with `{BUILD_COMMAND}` in the "
            "repository root.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _C


# Loaded at import, not on first call: a first call may happen inside torch.compile, which cannot
# trace an import or a warning without a graph break.
extension: ModuleType | None = _load_extension()


def _kernel_device_types() -> frozenset[str]:
    if extension is None:
        return frozenset()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(
        device_type
        for device_type in ("cpu", "cuda")
        if all(has_kernel(name, device_type.upper()) for name in OP_NAMES)
    )


# A constant set, so that the check below is plain Python that dynamo can fold.
_FUSED_DEVICE_TYPES = _kernel_device_types()


def fused_available(device: torch.device | str = "cpu") -> bool:
    """True when ``fastkd._C`` is built and has kernels for ``device``'s type (cpu or cuda)."""
    return torch.device(device).type in _FUSED_DEVICE_TYPES


def check_inputs(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float
) -> None:
    """Raise one clear error for malformed loss inputs; the same rules as the C++ ops.

    Shapes and devices raise ``ValueError``, dtypes ``TypeError``. Label values are not checked
    here (that needs the data; see ``wsld.py`` and the kernels).
    """
    if student_logits.dim() != 2:
        raise ValueError(
            f"student_logits must be 2-D (N, C), got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
            f"shape {tuple(student_logits.shape)}"
        )
    rows, classes = student_logits.shape
    if classes < 1:
        raise ValueError(f"logits need at least one class, got shape {tuple(student_logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(
            f"labels must have shape ({rows},) to match the logits, got {tuple(labels.shape)}"
        )
    if not (teacher_logits.device == student_logits.device == labels.device):
        raise ValueError(
            "all inputs must be on one device, got student_logits on "
            f"{student_logits.device}, teacher_logits on {teacher_logits.device}, labels on "
            f"{labels.device}"
        )
    for logits in (student_logits, teacher_logits):
        if logits.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
            )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    check_tau(tau)


def check_tau(tau: float) -> None:
    """Raise ``ValueError`` unless ``tau`` is a positive finite number, as the C++ ops do.

    The one Python check of the temperature for every loss function (the config checks
    ``loss.tau`` itself, to name the key).
    """
    if not (0.0 < tau < float("inf")):
        raise ValueError(f"tau must be a positive finite number, got {tau}")


def accumulate_dtype(student_logits: Tensor, teacher_logits: Tensor) -> torch.dtype:
    """float64 when either input is float64 (gradcheck), else float32: what the ops compute in."""
    if torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        return torch.float64
    return torch.float32


def _fake_forward_outputs(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float, count: int
) -> tuple[Tensor, ...]:
    check_inputs(student_logits, teacher_logits, labels, tau)
    dtype = accumulate_dtype(student_logits, teacher_logits)
    scalars = tuple(student_logits.new_empty((), dtype=dtype) for _ in range(count))
    row_stats = student_logits.new_empty((student_logits.shape[0], NUM_STATS), dtype=dtype)
    return (*scalars, row_stats)


def _register() -> None:
    """Fake implementations; only possible once the schemas exist."""

    @torch.library.register_fake("fastkd::wsld")
    def _wsld_fake(student_logits, teacher_logits, labels, tau, loss_weight):
        return _fake_forward_outputs(student_logits, teacher_logits, labels, tau, count=1)

    @torch.library.register_fake("fastkd::wsld_ce")
    def _wsld_ce_fake(student_logits, teacher_logits, labels, tau, loss_weight, ce_weight):
        return _fake_forward_outputs(student_logits, teacher_logits, labels, tau, count=4)

    @torch.library.register_fake("fastkd::wsld_backward")
    def _wsld_backward_fake(
        grad, student_logits, teacher_logits, labels, row_stats, tau, loss_weight, ce_weight
    ):
        check_inputs(student_logits, teacher_logits, labels, tau)
        torch._check(
            row_stats.shape == (student_logits.shape[0], NUM_STATS),
            lambda: f"row_stats must have shape (N, {NUM_STATS}), got {tuple(row_stats.shape)}",
        )
        return student_logits.new_empty(student_logits.shape)


if extension is not None:
    _register()
