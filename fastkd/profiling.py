"""Profiling a few training steps with ``torch.profiler``: a trace to open, a table to read.

``train.profile.enabled=true`` records ``train.profile.steps`` steps of the first epoch, after
skipping ``train.profile.skip`` (the first step compiles and warms up; never profile it), and writes
under ``run.dir/profile/`` (one set per rank, ``rank{R}`` in the names):

* ``trace_rank0.json``: the Chrome / Perfetto trace (open in https://ui.perfetto.dev or
  chrome://tracing), CPU and CUDA activity with input shapes;
* ``ops_rank0.txt``: PyTorch's operator table, sorted by self device time on a GPU (self CPU time
  on the CPU);
* ``ops_rank0.json``: the top operators and kernels as data (name, calls, self/total device and
  CPU time in microseconds, per step) and the time per step of each phase of the training step
  (teacher, student_forward, loss, backward, optimizer; CPU and device time), which is what
  benchmarks embed in their JSON.

The profiled steps (and the trace export) are slower than the others: the trainer leaves them out
of its images/sec. ``benchmarks/bench_train.py --profile DIR`` profiles a variant the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

__all__ = ["StepProfiler", "phase_times", "top_ops"]

log = logging.getLogger(__name__)

# The profiler's per-step marker wraps everything else: it is not an operator.
_STEP_MARKER = "ProfilerStep"
# The training step's phase ranges (engine.train_step): reported apart, not as operators.
_PHASE_PREFIX = "fastkd/"


def top_ops(prof: profile, *, device: bool, steps: int, limit: int = 25) -> list[dict[str, Any]]:
    """The ``limit`` most expensive operators/kernels of a finished profile, as plain data.

    Sorted by self device time when ``device`` (CUDA kernels), else by self CPU time. Times are
    microseconds: totals over the profiled steps and per step.
    """
    key = "self_device_time_total" if device else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not e.key.startswith((_STEP_MARKER, _PHASE_PREFIX))]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = []
    for event in events[:limit]:
        row = {
            "name": event.key,
            "calls": event.count,
            "self_cpu_us": event.self_cpu_time_total,
            "cpu_total_us": event.cpu_time_total,
        }
        if device:
            row["self_device_us"] = event.self_device_time_total
            row["device_total_us"] = event.device_time_total
        row["share"] = getattr(event, key) / total
        row["self_us_per_step"] = getattr(event, key) / max(1, steps)
        rows.append(row)
    return rows


def phase_times(prof: profile, *, device: bool, steps: int) -> list[dict[str, Any]]:
    """Time per step of each ``fastkd/<phase>`` range the training step marks (engine.PHASES):
    CPU time (Python + dispatch + launches) and, on a GPU, the device time of its kernels."""
    phases = []
    for event in prof.key_averages():
        if not event.key.startswith(_PHASE_PREFIX):
            continue
        row = {
            "phase": event.key.removeprefix(_PHASE_PREFIX),
            "cpu_ms_per_step": event.cpu_time_total / 1e3 / max(1, steps),
        }
        if device:
            row["device_ms_per_step"] = event.device_time_total / 1e3 / max(1, steps)
        phases.append(row)
    return phases


class StepProfiler:
    """Drive ``torch.profiler`` over steps ``skip+1 .. skip+steps`` of a loop; write the results.

    Call :meth:`step` once after every training step; it returns True right after the step that
    completed the recording and the files were written (the caller then restarts its timing).
    :meth:`close` stops the profiler if the loop ended early (nothing is written then).
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, skip: int, steps: int, device: torch.device, rank: int
    ) -> None:
        if skip < 1 or steps < 1:
            raise ValueError(f"profile skip and steps must be >= 1, got {skip}, {steps}")
        self.out_dir = Path(out_dir)
        self.steps = steps
        self.device_type = device.type
        self.rank = rank
        self.skip = skip
        self.result: dict[str, Any] | None = None
        self._seen = 0
        self._last = skip + steps  # the step whose end completes the recording
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # The last skipped step is the profiler's own warm-up (tracing started, results dropped),
        # so its start-up cost lands outside the recorded steps.
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=skip - 1, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
        )
        self._profiler.start()
        self._open = True

    def _write(self, prof: profile) -> None:
        recorded = min(self.steps, max(0, self._seen - self.skip))  # fewer if the loop ended early
        if recorded == 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"rank{self.rank}"
        trace = self.out_dir / f"trace_{tag}.json"
        prof.export_chrome_trace(str(trace))
        on_device = self.device_type == "cuda"
        sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=40)
        (self.out_dir / f"ops_{tag}.txt").write_text(table + "\n")
        ops = top_ops(prof, device=on_device, steps=recorded)
        phases = phase_times(prof, device=on_device, steps=recorded)
        payload = {
            "steps": recorded,
            "device": self.device_type,
            "sorted_by": sort_by,
            "phases": phases,
            "ops": ops,
        }
        (self.out_dir / f"ops_{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
        self.result = {
            "steps": recorded,
            "dir": str(self.out_dir),
            "phases": phases,
            "top_ops": ops[:10],
        }
        log.info(
            "profile of %d steps written to %s (open %s in https://ui.perfetto.dev)",
            recorded,
            self.out_dir,
            trace.name,
        )

    def step(self) -> bool:
        """Advance the profiler by one finished step; True when the recording just completed."""
        if not self._open:
            return False
        self._seen += 1
        self._profiler.step()
        if self._seen >= self._last:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self._open:
            self._open = False
            self._profiler.stop()

    @property
    def active(self) -> bool:
        """Whether steps are still to be recorded."""
        return self._open
