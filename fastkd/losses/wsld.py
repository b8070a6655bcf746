"""Weighted Soft Label Distillation (Zhou et al., ICLR 2021): the public loss API.

For student logits ``s``, teacher logits ``t`` (N x C) and labels ``y``::

    q = softmax(s / tau), p = softmax(t / tau), ce_i = -sum_c p_ic log q_ic
    CE_s_i = -log softmax(s)_{i,y_i},  CE_t_i = -log softmax(t)_{i,y_i}     (tau = 1, detached)
    w_i = 1 - exp(-max(CE_s_i / (CE_t_i + 1e-7), 0))                          (no gradient)
    wsld = loss_weight * tau^2 * mean_i(w_i * ce_i)
    total = ce_weight * mean_i(CE_s_i) + wsld

``wsld`` equals mmrazor's ``WSLD(tau, loss_weight)(s, t)`` with ``gt_label = y``. Two
implementations compute it: ``"fused"``, one custom op per direction (kernels/, see ``ops.py``),
and ``"reference"``, mmrazor's op sequence in plain PyTorch. Both compute in float32 whatever the
logits' dtype (float64 for float64 logits) and return float32 (float64) scalars; the teacher
never receives a gradient.

Two deliberate differences from mmrazor, both invisible for ordinary batches:

* N = 0 gives 0, where mmrazor's mean over an empty batch gives NaN: a NaN would poison a
  running loss sum (an empty shard at the end of an evaluation, a filtered batch).
* ``1 - exp(-x)`` is evaluated as ``-expm1(-x)``, the same value without the cancellation that
  costs float32 digits when x is small.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastkd.losses import ops

__all__ = [
    "Impl",
    "LossTerms",
    "WSLDLoss",
    "WSLDRows",
    "fused_available",
    "kd_loss",
    "wsld_ce_loss",
    "wsld_ce_terms",
    "wsld_loss",
    "wsld_reference",
]

Impl = Literal["auto", "fused", "reference"]

fused_available = ops.fused_available

_IMPLS = ("auto", "fused", "reference")
_WEIGHT_EPS = 1e-7  # added to the teacher's hard-label CE before dividing, as in mmrazor


class LossTerms(NamedTuple):
    """The trainer's objective and its parts, as 0-dim float32 tensors.

    ``total`` (= ce_weight * ce + wsld) carries the gradient w.r.t. the student logits; ``ce``
    (mean hard-label CE of the student), ``wsld`` and ``weight_mean`` (mean of w_i) are detached
    and meant for logging: reading them is left to the caller, so nothing here syncs the host.
    """

    total: Tensor
    ce: Tensor
    wsld: Tensor
    weight_mean: Tensor


class WSLDRows(NamedTuple):
    """Per-row values behind one evaluation of the loss, shape (N,), detached, in the loss's
    accumulation dtype (float32; float64 for float64 logits). The fused op has them already (its
    ``row_stats``), so they cost nothing extra to return; `fastkd.diagnostics` reads them."""

    weight: Tensor  # w_i
    student_ce: Tensor  # CE_s_i, the student's hard-label cross-entropy (tau = 1)
    soft_ce: Tensor  # ce_i, the soft-label cross-entropy at tau
    teacher_max: Tensor  # max_c t_ic


def _use_fused(impl: str, student_logits: Tensor) -> bool:
    """Whether ``impl`` selects the fused op for these logits (raising if it cannot)."""
    if impl == "reference":
        return False
    device_type = student_logits.device.type
    if impl == "auto":
        # float64 has CPU kernels only (it exists for gradcheck). Under torch.func transforms
        # (grad, vjp, vmap: per-sample gradients and the like) the op's C++ autograd formula
        # cannot run, so the reference formulation, which they differentiate, is used instead.
        return (
            device_type in ops._FUSED_DEVICE_TYPES
            and not (device_type != "cpu" and student_logits.dtype == torch.float64)
            and not torch._C._are_functorch_transforms_active()
        )
    if impl == "fused":
        if ops.extension is None:
            raise RuntimeError(
                "impl='fused' needs the fastkd._C extension, which is not built; run "
                f"`{ops.BUILD_COMMAND}` in the repository root (or use impl='auto')"
            )
        if not fused_available(device_type):
            raise RuntimeError(
                f"impl='fused': fastkd._C has no kernel for {device_type} tensors; rebuild it "
                f"where a CUDA toolkit is available (`{ops.BUILD_COMMAND}`) or use impl='auto'"
            )
        return True
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def describe_impl(impl: Impl, device: torch.device | str) -> tuple[str, str | None]:
    """Which WSLD implementation ``impl`` runs on ``device``, and a warning when the fused op
    was asked for (``auto``) but this build has no kernel for that device.

    ``impl="fused"`` without a kernel raises ``ValueError`` (as its first call would), so a run
    stops at start rather than at its first step.
    """
    device_type = torch.device(device).type
    if impl == "reference":
        return "reference (plain PyTorch)", None
    if fused_available(device_type):
        return ("fused CUDA op" if device_type == "cuda" else "fused C++ op (CPU kernels)"), None
    if ops.extension is None:
        why = f"fastkd._C is not built (`{ops.BUILD_COMMAND}` builds it)"
    else:
        why = (
            f"this fastkd._C has no {device_type} kernel: rebuild it where a CUDA toolkit is "
            f"found (`FASTKD_BUILD_CUDA=1 {ops.BUILD_COMMAND}`, CUDA_HOME set)"
        )
    if impl == "fused":
        raise ValueError(f"loss.impl=fused but {why}; or use loss.impl=auto")
    warning = None
    if device_type != "cpu" or ops.extension is not None:  # a missing build already warned
        warning = f"the WSLD loss runs the slower reference implementation: {why}"
    return "reference (plain PyTorch; no fused kernel for this device)", warning


def _check_label_values(labels: Tensor, num_classes: int) -> None:
    """Range-check labels where that costs no device synchronization (CPU, eager)."""
    if (
        labels.device.type != "cpu"
        or labels.numel() == 0
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    ):
        # On CUDA, reading the labels would stall the stream, and traced or vmapped labels have
        # no values to read: gather's own bounds check (or inductor's) reports bad labels there.
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"labels must lie in [0, {num_classes}), found {bad}")


def wsld_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    tau: float,
    loss_weight: float,
    ce_weight: float = 0.0,
) -> LossTerms:
    """All loss terms in plain PyTorch (mmrazor's op sequence, at float32 or float64).

    Validates its inputs like the fused op; ``total`` has the gradient, the rest are detached.
    """
    return _reference_terms(
        student_logits, teacher_logits, labels, tau=tau, loss_weight=loss_weight,
        ce_weight=ce_weight, with_rows=False,
    )[0]  # fmt: skip


def _reference_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    tau: float,
    loss_weight: float,
    ce_weight: float,
    with_rows: bool,
) -> tuple[LossTerms, WSLDRows | None]:
    """`wsld_reference`'s terms and (``with_rows``) the per-row values behind them."""
    ops.check_inputs(student_logits, teacher_logits, labels, tau)
    _check_label_values(labels, student_logits.shape[1])
    dtype = ops.accumulate_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    index = labels.long().unsqueeze(1)

    log_q = F.log_softmax(student / tau, dim=1)
    p = F.softmax(teacher / tau, dim=1)
    soft_ce = -(p * log_q).sum(dim=1)

    ce_student = -F.log_softmax(student, dim=1).gather(1, index).squeeze(1)
    ce_teacher = -F.log_softmax(teacher, dim=1).gather(1, index).squeeze(1)
    ratio = ce_student.detach() / (ce_teacher + _WEIGHT_EPS)
    weight = -torch.expm1(-ratio.clamp_min(0.0))

    # Sums scaled by 1 / max(N, 1) rather than means: N = 0 gives 0, not NaN (module docstring).
    inv_rows = 1.0 / max(student_logits.shape[0], 1)
    wsld = (weight * soft_ce).sum() * (loss_weight * tau * tau * inv_rows)
    ce = ce_student.sum() * inv_rows
    # No 0 * ce term when ce_weight is 0: it would turn an infinite CE (a -inf logit) into NaN.
    total = ce * ce_weight + wsld if ce_weight != 0 else wsld
    terms = LossTerms(total, ce.detach(), wsld.detach(), weight.sum().detach() * inv_rows)
    if not with_rows:  # the teacher's row maxima would be one more pass over its logits
        return terms, None
    return terms, WSLDRows(weight, ce_student.detach(), soft_ce.detach(), teacher.amax(dim=1))


def wsld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    tau: float = 1.0,
    loss_weight: float = 1.0,
    impl: Impl = "auto",
) -> Tensor:
    """The WSLD loss ``loss_weight * tau^2 * mean_i(w_i * ce_i)`` as a 0-dim float32 tensor.

    Equal to mmrazor's ``WSLD(tau, loss_weight)(student_logits, teacher_logits)`` with
    ``gt_label = labels``; differentiable w.r.t. ``student_logits`` only. ``impl``: ``"fused"``
    (the custom op; errors if not built), ``"reference"`` (plain PyTorch) or ``"auto"`` (fused
    when built for the logits' device). Works under autocast and ``torch.compile(fullgraph=True)``;
    under ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``) ``"auto"`` uses the reference.
    """
    if _use_fused(impl, student_logits):
        loss, _ = torch.ops.fastkd.wsld.default(
            student_logits, teacher_logits, labels, float(tau), float(loss_weight)
        )
        return loss
    terms = wsld_reference(
        student_logits, teacher_logits, labels, tau=tau, loss_weight=loss_weight, ce_weight=0.0
    )
    return terms.total


def wsld_ce_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    tau: float,
    loss_weight: float,
    ce_weight: float,
    impl: Impl = "auto",
) -> LossTerms:
    """The trainer's objective ``ce_weight * mean_i(CE_s_i) + wsld`` with its logged parts.

    With the fused op this is one kernel pass per direction for both terms, which share the
    student's log-sum-exp. ``impl`` as in ``wsld_loss``.
    """
    if _use_fused(impl, student_logits):
        # The op's autograd formula (C++) gives total its gradient; row_stats is for backward.
        *terms, _ = torch.ops.fastkd.wsld_ce.default(
            student_logits, teacher_logits, labels, float(tau), float(loss_weight), float(ce_weight)
        )
        return LossTerms(*terms)
    return wsld_reference(
        student_logits,
        teacher_logits,
        labels,
        tau=tau,
        loss_weight=loss_weight,
        ce_weight=ce_weight,
    )


def wsld_ce_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    tau: float,
    loss_weight: float,
    ce_weight: float,
    impl: Impl = "auto",
) -> tuple[LossTerms, WSLDRows]:
    """`wsld_ce_loss`'s terms and the per-row values behind them (`WSLDRows`: w_i, CE_s_i, ce_i,
    max_c t_ic), for diagnostics. The fused op has them already (its ``row_stats``); the
    reference computes the teacher's row maxima on top (one more pass over its logits)."""
    if not _use_fused(impl, student_logits):
        terms, rows = _reference_terms(
            student_logits, teacher_logits, labels, tau=tau, loss_weight=loss_weight,
            ce_weight=ce_weight, with_rows=True,
        )  # fmt: skip
        assert rows is not None
        return terms, rows
    *terms, stats = torch.ops.fastkd.wsld_ce.default(
        student_logits, teacher_logits, labels, float(tau), float(loss_weight), float(ce_weight)
    )
    stats = stats.detach()
    rows = WSLDRows(
        stats[:, ops.STATS_WEIGHT],
        stats[:, ops.STATS_STUDENT_CE],
        stats[:, ops.STATS_SOFT_CE],
        stats[:, ops.STATS_TEACHER_MAX],
    )
    return LossTerms(*terms), rows


class WSLDLoss(nn.Module):
    """Module form of ``wsld_loss``: ``WSLDLoss(tau, loss_weight, impl)(s, t, labels)``."""

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0, impl: Impl = "auto") -> None:
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.tau = float(tau)
        self.loss_weight = float(loss_weight)
        self.impl = impl

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        return wsld_loss(
            student_logits, teacher_logits, labels, self.tau, self.loss_weight, self.impl
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}, impl={self.impl!r}"


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, loss_weight: float = 1.0
) -> Tensor:
    """Hinton's KD loss ``loss_weight * tau^2 * KL(softmax(t/tau) || softmax(s/tau))``.

    Batch mean over rows, computed in float32 (float64 for float64 logits); the teacher gets no
    gradient; N = 0 gives 0.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "kd_loss needs student and teacher logits of one shape (N, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    ops.check_tau(tau)
    dtype = ops.accumulate_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / tau, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / tau, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl * (loss_weight * tau * tau / max(student_logits.shape[0], 1))
