"""Distillation diagnostics: what the teacher's soft labels do to the batch, live and cheap.

The paper's question is which samples the teacher's soft label helps and how much the weights
``w_i = 1 - exp(-CE_s_i / CE_t_i)`` down-weight them. Per step, `step_counts` turns the loss's
per-row values (`fastkd.losses.WSLDRows`, which the fused op returns with no extra pass) into one
small vector of sums on the device; the meter adds the vectors up and reads them with its log
line, and `summarize` turns a sum of vectors (an interval, an epoch, every rank) into:

* ``w_mean``, ``w_p10``, ``w_p50``, ``w_p90``: the distribution of w over the rows. The
  quantiles come from a 100-bin cumulative histogram on [0, 1] summed over the steps (quantiles
  of per-step quantiles would not be the interval's), interpolated within a bin: exact to 0.01.
* ``reg_frac``: the fraction of *regularization samples*, rows where the student's hard-label CE
  is below the teacher's (CE_s < CE_t, the paper's section 3). Since w is increasing in
  CE_s / CE_t, they are exactly the rows with w < 1 - 1/e (up to rounding at the boundary).
* ``w_reg``, ``w_rest``: the mean w on them and on the other rows (ratios of sums).
* ``teacher_train_top1``: the teacher's top-1 on the (augmented) training batches: rows with
  ``t[y] == max t``, a tie at the maximum counting as a hit. For WSLD a gather beside the op's
  row maxima, not a pass over the logits; for ``loss.kind=kd`` (no row maxima) one max pass.

A ratio with no rows behind it (``w_reg`` when no row is a regularization sample) is None, as
``top1`` is in an epoch that was not evaluated; counts of no rows at all give no diagnostics.
Nothing here reads a value on the host: `step_counts` queues a handful of N-element ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastkd.losses import WSLDRows

__all__ = [
    "BINS",
    "COUNTS",
    "FIELDS",
    "REG_THRESHOLD",
    "describe",
    "histogram_quantile",
    "step_counts",
    "summarize",
]

# The fields `summarize` can return.
FIELDS = ("w_mean", "w_p10", "w_p50", "w_p90", "reg_frac", "w_reg", "w_rest", "teacher_train_top1")
# The objective's logged terms carry the step's count vector under this name (fastkd.engine).
COUNTS = "diagnostics"
BINS = 100  # histogram bins of w on [0, 1]: quantiles exact to 1 / BINS
# w < REG_THRESHOLD  <=>  CE_s / CE_t < 1, since w = 1 - exp(-CE_s / CE_t).
REG_THRESHOLD = 1.0 - math.exp(-1.0)

# Layout of a count vector: rows and teacher hits, then (WSLD only) the w sums and the
# cumulative histogram: entry ``_HIST + k`` counts the rows with w < (k + 1) / BINS
# (the last, k = BINS - 1, every row: its edge is +inf so that w = 1 counts).
_ROWS, _TEACHER, _REG, _W_REG, _W_ALL, _HIST = range(6)
_TEACHER_ONLY = _REG  # length of a vector without w (loss.kind=kd)


def step_counts(teacher_logits: Tensor, labels: Tensor, rows: WSLDRows | None = None) -> Tensor:
    """One step's count vector (float32, on the logits' device), to be summed over steps.

    ``rows``: the WSLD loss's per-row values; without them (Hinton KD) only the teacher's hits
    are counted, with a max over ``teacher_logits``.
    """
    labels = labels.long()
    label_logit = teacher_logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    if rows is None:
        hits = (label_logit >= teacher_logits.amax(dim=1)).sum().float()
        return torch.stack([_filled(labels.shape[0], hits), hits])
    w = rows.weight.float()
    hits = (label_logit.to(rows.teacher_max.dtype) >= rows.teacher_max).sum()
    reg = w < REG_THRESHOLD
    edges = torch.arange(1, BINS + 1, device=w.device, dtype=w.dtype) / BINS
    edges = torch.where(edges >= 1.0, math.inf, edges)
    below = (w.unsqueeze(1) < edges).sum(dim=0)
    head = torch.stack(
        [
            _filled(labels.shape[0], w),
            hits.float(),
            reg.sum().float(),
            torch.where(reg, w, 0.0).sum(),
            w.sum(),
        ]
    )
    return torch.cat([head, below.float()])


def _filled(value: float, like: Tensor) -> Tensor:
    """A 0-dim float32 ``value`` on ``like``'s device, written there (no host-to-device copy)."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def histogram_quantile(below: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of values in [0, 1] from their cumulative histogram ``below``
    (``below[k]`` = how many are < (k + 1) / len(below)), linear within a bin; None if empty."""
    total = below[-1]
    if total <= 0:
        return None
    target = q * total
    previous = 0.0
    for k, count in enumerate(below):
        if count >= target and count > previous:
            return (k + (target - previous) / (count - previous)) / len(below)
        previous = count
    return 1.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarize(counts: Sequence[float]) -> dict[str, float | None]:
    """The diagnostics of a sum of `step_counts` vectors (see the module docstring); empty when
    the vectors count no row (or there are none)."""
    if len(counts) < _TEACHER_ONLY or counts[_ROWS] <= 0:
        return {}
    rows = counts[_ROWS]
    result = {"teacher_train_top1": _ratio(counts[_TEACHER], rows)}
    if len(counts) == _TEACHER_ONLY:
        return result
    reg, w_reg, w_all = counts[_REG], counts[_W_REG], counts[_W_ALL]
    below = counts[_HIST:]
    result.update(
        w_mean=_ratio(w_all, rows),
        w_p10=histogram_quantile(below, 0.1),
        w_p50=histogram_quantile(below, 0.5),
        w_p90=histogram_quantile(below, 0.9),
        reg_frac=_ratio(reg, rows),
        w_reg=_ratio(w_reg, reg),
        w_rest=_ratio(w_all - w_reg, rows - reg),
    )
    return result


def describe(summary: dict[str, float | None]) -> str:
    """The compact progress-line form of `summarize`'s result ('' when empty)."""

    def f(key: str, spec: str = ".2f") -> str:  # a value of no rows reads "-"
        value = summary[key]
        return "-" if value is None or math.isnan(value) else format(value, spec)

    parts = []
    if "w_mean" in summary:
        parts.append(
            f"w {f('w_mean')} (p10/50/90 {f('w_p10')}/{f('w_p50')}/{f('w_p90')}) "
            f"reg {f('reg_frac', '.0%')} (w {f('w_reg')} vs {f('w_rest')})"
        )
    if "teacher_train_top1" in summary:
        parts.append(f"teacher top-1 {f('teacher_train_top1', '.0%')}")
    return ", ".join(parts)
