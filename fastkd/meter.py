"""The training loop's meter: loss terms, train top-1, images/sec, data wait, MFU, memory, ETA.

`TrainMeter` is what the epoch loop calls once per step (`TrainMeter.update`). It accumulates the
loss terms and the correct predictions in device tensors and reads them back (one host
synchronization) only at log intervals, every ``train.log_every`` steps. Throughput counts only
steady-state steps: the run's first step (compilation and warm-up) is reported apart and the
steps ``train.profile.enabled`` records are left out. Each interval writes a ``step`` record to
metrics.jsonl and a progress line with an ETA; `TrainMeter.end_epoch` reduces the epoch's sums
across ranks.

Divergence is found at the same reads: the meter keeps each step's (detached) loss terms until
the next read and reads them with the means, so a non-finite loss is caught at the first log
line after it, with its epoch, step and terms (`TrainMeter.nonfinite`), without a per-step read.
Under fp16 loss scaling the steps the grad scaler skipped (a ``skipped`` term) are counted.
A run resumed mid-epoch restores the epoch's sums (`TrainMeter.state_dict`), so the epoch's
record is the one the uninterrupted run writes.

Distillation diagnostics (`fastkd.diagnostics`) arrive as a count vector among the terms; the
meter sums it on the device, reads it with the log line's values, and reports it per interval
(a step record's ``w_*``, ``reg_*``, ``teacher_train_top1`` cover the steps since the previous step
record, where its loss terms are the epoch's running means) and per epoch (over every rank).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fastkd import diagnostics
from fastkd.distributed import DistInfo, all_reduce_sum
from fastkd.logging import MetricsWriter, format_duration

log = logging.getLogger("fastkd")

# Above this share of step time spent waiting for batches, a run is data-bound: warn once.
_DATA_BOUND_WAIT_FRAC = 0.3


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class NonFinite:
    """The first step whose loss was not finite: where, and its loss terms."""

    epoch: int
    step: int  # within the epoch, 1-based
    global_step: int
    terms: dict[str, float]

    def describe(self, steps: int) -> str:
        terms = ", ".join(f"{k} {v:.4g}" for k, v in self.terms.items() if k != "loss")
        return (
            f"epoch {self.epoch} step {self.step}/{steps} (global step {self.global_step}): "
            f"loss {self.terms.get('loss', float('nan')):.4g} ({terms})"
        )


# The grad scaler's skipped steps travel as a 0/1 loss term under this name (fastkd.engine).
SKIPPED = "skipped"


@dataclass
class _Interval:
    """The steps since the last log line (or since a step left out of images/sec)."""

    start: float
    steps: int = 0
    images: int = 0
    wait_s: float = 0.0


class TrainMeter:
    """Meters the training loop; one per run (it remembers the compile step across epochs)."""

    def __init__(
        self,
        metrics: MetricsWriter,
        *,
        optimizer: torch.optim.Optimizer,
        dist: DistInfo,
        log_every: int,
        compiled: bool,
        flops_per_image: float | None = None,
        peak_flops: float | None = None,
        diagnostics: bool = True,
    ) -> None:
        """``diagnostics``: whether this run's steps carry `fastkd.diagnostics` counts
        (train.diagnostics); without, counts restored from a checkpoint are dropped."""
        self.metrics = metrics
        self.diagnostics = diagnostics
        self.optimizer = optimizer  # its learning rate is read at log intervals
        self.device, self.world_size = dist.device, dist.world_size
        self.log_every, self.compiled = log_every, compiled
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.compile_time_s: float | None = None  # the run's first step, once it has run
        self.nonfinite: NonFinite | None = None  # the first non-finite loss read, if any
        self._data_bound_warned = False
        self.start_epoch(0, 0, 0)

    def start_epoch(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        start: int = 0,
        resume: dict[str, Any] | None = None,
    ) -> None:
        """Reset the epoch's sums for ``epoch`` of ``epochs``, ``steps`` steps long, whose next
        step is ``start + 1``.

        ``resume``: a `state_dict` saved after step ``start`` of this epoch, whose sums continue
        (without it, the epoch's means cover the steps from ``start + 1`` on).
        """
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self._term_sums: dict[str, torch.Tensor] = {}
        self._correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self._step = self._first_step = start  # the step of the epoch (1-based) last counted
        self._steps_done = self._images_seen = 0  # what the sums hold
        self._counts: torch.Tensor | None = None  # the epoch's diagnostics counts (float64)
        self._counts_read: list[float] | None = None  # their values at the last read
        if resume:
            self._term_sums = {k: v.to(self.device) for k, v in resume["term_sums"].items()}
            self._correct = resume["correct"].to(self.device)
            self._steps_done, self._images_seen = resume["steps_done"], resume["images_seen"]
            # Absent in checkpoints from before diagnostics; dropped when they are now off.
            if resume.get("counts") is not None and self.diagnostics:
                self._counts = resume["counts"].to(self.device)
                self._counts_read = resume.get("counts_read")  # where the last log line was
        self._recent: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self._timed_images, self._timed_s = 0, 0.0  # steady-state steps only
        self._epoch_start = time.perf_counter()
        self._interval = _Interval(self._epoch_start)

    def state_dict(self) -> dict[str, Any]:
        """The epoch's sums so far (CPU tensors), for a checkpoint written inside the epoch."""
        return {
            "term_sums": {k: v.detach().cpu().clone() for k, v in self._term_sums.items()},
            "correct": self._correct.detach().cpu().clone(),  # a copy: the sum grows in place
            "steps_done": self._steps_done,
            "images_seen": self._images_seen,
            "counts": None if self._counts is None else self._counts.detach().cpu().clone(),
            "counts_read": self._counts_read,  # so the next step record is the same interval
        }

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent inside counts as waiting for data."""
        start = time.perf_counter()
        yield
        self._interval.wait_s += time.perf_counter() - start

    def update(
        self,
        terms: dict[str, torch.Tensor],
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        global_step: int,
        excluded: bool = False,
    ) -> None:
        """Count one step; log when an interval ends. ``excluded``: keep it out of images/sec."""
        if diagnostics.COUNTS in terms:  # a vector of sums: summed as it is, never averaged
            terms = dict(terms)
            counts = terms.pop(diagnostics.COUNTS).double()
            self._counts = counts if self._counts is None else self._counts + counts
        for name, value in terms.items():  # device tensors: no host synchronization here
            self._term_sums[name] = self._term_sums.get(name, 0) + value.float()
        self._correct += (student_logits.detach().argmax(dim=1) == labels).sum()
        images = labels.shape[0]
        self._step += 1
        self._steps_done += 1
        self._recent.append((self._step, global_step, terms))  # checked at the next read
        self._images_seen += images
        self._interval.steps += 1
        self._interval.images += images
        if self.compile_time_s is None:
            self._report_compile_step()
        elif excluded:
            self._interval = _Interval(time.perf_counter())
        elif self._step % self.log_every == 0 or self._step == self.steps:
            self._log_interval(global_step)

    def _report_compile_step(self) -> None:
        # The run's first step compiles (torch.compile) and warms up: report it, never count it.
        sync(self.device)
        self.compile_time_s = time.perf_counter() - self._epoch_start
        self.metrics.write(
            "compile",
            epoch=self.epoch,
            seconds=round(self.compile_time_s, 3),
            compiled=self.compiled,
        )
        log.info("first step (compile + warm-up) took %.1fs", self.compile_time_s)
        self._interval = _Interval(time.perf_counter())

    def _read(self, head: torch.Tensor) -> list[float]:
        """``head`` (a 1-D device tensor) and the loss terms of the steps since the last read, in
        one host read; records the first non-finite loss in `nonfinite`. Returns head's values."""
        recent, self._recent = self._recent, []
        parts = [head.double()]
        if recent:  # one stack of the 0-dim terms (float32 already: .float() copies nothing)
            parts.append(torch.stack([v.float() for *_, terms in recent for v in terms.values()]))
        values = torch.cat([p.double() for p in parts]).tolist()  # the read's one host sync
        offset = head.numel()
        for step, global_step, terms in recent:
            read = dict(zip(terms, values[offset : offset + len(terms)], strict=True))
            offset += len(terms)
            if self.nonfinite is None and not math.isfinite(read.get("loss", 0.0)):
                self.nonfinite = NonFinite(self.epoch, step, global_step, read)
        return values[: head.numel()]

    def _counted(self, record: dict[str, float], steps: float) -> dict[str, Any]:
        """The skipped-step mean as a count (``skipped_steps``); other terms unchanged."""
        if SKIPPED in record:
            record = dict(record)
            record["skipped_steps"] = round(record.pop(SKIPPED) * steps)
        return record

    def _diagnostics(self, counts: list[float]) -> dict[str, float]:
        """The diagnostics of the counts summed since the last read; remembers ``counts``."""
        since = counts
        if self._counts_read is not None:
            since = [now - then for now, then in zip(counts, self._counts_read, strict=True)]
        self._counts_read = counts
        return diagnostics.summarize(since)

    def _log_interval(self, global_step: int) -> None:
        sums = self._term_sums
        means = torch.stack([v.reshape(()).double() for v in sums.values()]) / self._steps_done
        head = means if self._counts is None else torch.cat([means, self._counts])
        values = self._read(head)
        record = self._counted(dict(zip(sums, values[: len(sums)], strict=True)), self._steps_done)
        record.update(self._diagnostics(values[len(sums) :]))
        interval = self._interval
        elapsed = max(1e-9, time.perf_counter() - interval.start)
        self._timed_images += interval.images
        self._timed_s += elapsed
        img_per_s = interval.images * self.world_size / elapsed
        wait_frac = min(1.0, interval.wait_s / elapsed)
        lr = self.optimizer.param_groups[0]["lr"]
        extra: dict[str, float] = {}
        if self.flops_per_image and self.peak_flops:
            extra["mfu"] = img_per_s / self.world_size * self.flops_per_image / self.peak_flops
        if self.device.type == "cuda":  # the caching allocator's own counter: no device sync
            extra["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.write(
            "step",
            epoch=self.epoch,
            step=self._step,
            global_step=global_step,
            lr=lr,
            img_per_s=img_per_s,
            data_wait_frac=wait_frac,
            **record,
            **extra,
        )
        remaining_steps = (self.steps - self._step) + (self.epochs - self.epoch) * self.steps
        eta_s = remaining_steps * elapsed / max(1, interval.steps)
        self._print(record, extra, lr=lr, img_per_s=img_per_s, wait_frac=wait_frac, eta_s=eta_s)
        if wait_frac > _DATA_BOUND_WAIT_FRAC and not self._data_bound_warned:
            self._data_bound_warned = True
            warnings.warn(
                f"training is data-bound: {wait_frac:.0%} of step time is spent waiting for "
                "batches; raise data.workers, use data.backend=dali (GPU decode) or put the data "
                "on faster storage",
                stacklevel=4,
            )
        self._interval = _Interval(time.perf_counter())

    def _print(
        self,
        record: dict[str, Any],
        extra: dict[str, float],
        *,
        lr: float,
        img_per_s: float,
        wait_frac: float,
        eta_s: float,
    ) -> None:
        summary = {k: record[k] for k in record if k in diagnostics.FIELDS}  # shown compactly
        terms_text = " ".join(
            f"{k} {v:.4f}"
            for k, v in record.items()
            if k not in ("loss", "skipped_steps") and k not in summary
            # wsld_weight: the epoch's running mean of w, next to the interval's w_mean
            and not (k == "wsld_weight" and "w_mean" in summary)
        )  # fmt: skip
        if summary:
            terms_text += "; " + diagnostics.describe(summary)
        if record.get("skipped_steps"):
            terms_text += f"; fp16 steps skipped {record['skipped_steps']}"
        device_text = f" mfu {extra['mfu']:.1%}" if "mfu" in extra else ""
        if "max_mem_gib" in extra:
            device_text += f" mem {extra['max_mem_gib']:.1f} GiB"
        log.info(
            "epoch %d/%d step %d/%d loss %.4f (%s) lr %.4g | %.0f img/s data-wait %.0f%%%s | ETA %s",
            self.epoch,
            self.epochs,
            self._step,
            self.steps,
            record["loss"],
            terms_text,
            lr,
            img_per_s,
            100 * wait_frac,
            device_text,
            format_duration(eta_s),
        )

    def end_epoch(self) -> dict[str, float]:
        """Mean loss terms and train top-1 over every rank, images/sec and the epoch's time."""
        sync(self.device)
        epoch_s = time.perf_counter() - self._epoch_start
        timed_images, timed_s = self._timed_images, self._timed_s
        if self._interval.images:  # steps after the last log line (the loader ended early)
            timed_images += self._interval.images
            timed_s += time.perf_counter() - self._interval.start
        if timed_s <= 0:  # a one-step epoch: only the warm-up step exists, report it as it is
            timed_images, timed_s = self._images_seen, epoch_s
            if self._step == self._first_step:  # no step ran here (resumed after the last one)
                timed_images = 0  # images/sec unknown: NaN
        names = list(self._term_sums)
        totals = torch.zeros(len(names) + 3, dtype=torch.float64, device=self.device)
        for i, name in enumerate(names):
            totals[i] = self._term_sums[name].double()
        totals[-3], totals[-2], totals[-1] = self._correct, self._images_seen, self._steps_done
        if self._counts is not None:  # one reduction and one read for both
            totals = torch.cat([self._counts, totals])
        values = self._read(all_reduce_sum(totals))
        counts, values = values[: len(values) - len(names) - 3], values[-len(names) - 3 :]
        result = {name: values[i] / max(1.0, values[-1]) for i, name in enumerate(names)}
        result = self._counted(result, values[-1] / self.world_size)
        result["train_top1"] = values[-3] / max(1.0, values[-2])
        result.update(diagnostics.summarize(counts))
        result["img_per_s"] = (
            timed_images * self.world_size / max(1e-9, timed_s) if timed_images else float("nan")
        )
        result["epoch_time_s"] = epoch_s
        return result
