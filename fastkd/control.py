"""When a run stops or checkpoints between steps: signals, the checkpoint clock, divergence.

`StopSignals` turns SIGTERM and SIGINT (SLURM's preemption warning, torchrun forwarding it,
Ctrl-C) into a request once training runs (during setup, into `Preempted` at once): the step in
flight finishes, the trainer saves ``last.pt`` with the exact
position and exits with `fastkd.errors.EXIT_PREEMPTED`. A second signal exits at once, without a
checkpoint. A signal that arrives again within `StopSignals.SAME_REQUEST_S` of the first is the
same request relayed (SLURM signals every process of a job step, a terminal's Ctrl-C every process
of its group, and torchrun forwards the signal it got to its workers, so each worker sees it twice
within milliseconds) and is ignored.

`RunControl.after_step` decides, after every step, whether to stop, to write a timed checkpoint
(``train.checkpoint_minutes``, rank 0's clock) or to end a diverged run; under torchrun every rank
takes the same decision at the same step. A world of one decides from its own flags at once. With
several ranks the flags travel over a Gloo (CPU) group, all-reduced (max) asynchronously: the
exchange launched after step k is read after step k+1, so a decision lags one step and the step
never waits on the network or the GPU. Nothing here reads a device tensor.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as tdist

from fastkd.distributed import DistInfo, control_group
from fastkd.errors import Preempted

log = logging.getLogger("fastkd")


class StopSignals:
    """SIGTERM / SIGINT as a request to stop at the next step boundary (a context manager).

    Until `defer` is called (the trainer calls it when training starts) a signal raises
    `Preempted` at once: during setup there is no step to finish and nothing new to save.
    Installed only from the main thread (Python's rule for signal handlers); elsewhere it is
    inert and signals keep their previous handling.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    # torchrun relays the signal it got (the same one) to workers that SLURM or the terminal
    # already signalled, within milliseconds; a person asking twice waits longer than this.
    SAME_REQUEST_S = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.received: str | None = None  # the first signal's name, once one arrived
        self._clock = clock
        self._first_at = 0.0
        self._deferred = False
        self._previous: dict[int, Any] = {}

    def defer(self) -> None:
        """From now on a signal is a request, acted on after the step in flight."""
        self._deferred = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = self._clock()
        if self.received is None:
            self.received, self._first_at = name, now
            if not self._deferred:
                raise Preempted(f"stopped by {name} before training started: nothing to save")
            log.warning(
                "received %s: finishing the current step, then saving last.pt and exiting "
                "(send it again to exit at once, without a checkpoint)",
                name,
            )
            return
        if now - self._first_at < self.SAME_REQUEST_S:
            return  # the same request, relayed by a launcher
        log.warning("received %s again: exiting at once, without a checkpoint", name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@dataclass(frozen=True)
class Decision:
    """What every rank does after a step: stop (signal), write a timed checkpoint, or end a
    diverged run. At most one field is acted on: diverged, then stop, then checkpoint."""

    stop: bool = False
    checkpoint: bool = False
    diverged: bool = False


_FLAGS = ("stop", "checkpoint", "diverged")


class RunControl:
    """The same stop / checkpoint / divergence decision on every rank after each step."""

    def __init__(
        self,
        dist: DistInfo,
        signals: StopSignals,
        checkpoint_minutes: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.signals = signals
        self._is_main = dist.is_main
        self._interval_s = checkpoint_minutes * 60.0
        self._clock = clock
        self._last_checkpoint = clock()
        self._group = control_group() if dist.enabled else None
        if dist.enabled and self._group is None:
            raise RuntimeError(
                "RunControl under torchrun needs fastkd.distributed.init_distributed's groups"
            )
        self._pending: tuple[Any, torch.Tensor] | None = None  # (work, buffer) of the exchange

    def checkpointed(self) -> None:
        """A checkpoint was just written: the clock of timed checkpoints starts again."""
        self._last_checkpoint = self._clock()

    def _local(self, diverged: bool) -> Decision:
        due = (
            self._is_main
            and self._interval_s > 0
            and self._clock() - self._last_checkpoint >= self._interval_s
        )
        if due:  # asked once: the clock restarts now, not when the (lagging) answer comes back
            self.checkpointed()
        return Decision(stop=self.signals.received is not None, checkpoint=due, diverged=diverged)

    def _exchange(self, local: Decision, *, wait: bool) -> Decision:
        """The ranks' flags, max-reduced: the previous exchange's result, or (``wait``) this one's."""
        buffer = torch.tensor([float(getattr(local, f)) for f in _FLAGS])
        work = tdist.all_reduce(buffer, op=tdist.ReduceOp.MAX, group=self._group, async_op=True)
        if wait:
            work.wait()
            return _decision(buffer)
        previous, self._pending = self._pending, (work, buffer)
        if previous is None:
            return Decision()
        previous[0].wait()
        return _decision(previous[1])

    def _drain(self) -> Decision:
        if self._pending is None:
            return Decision()
        (work, buffer), self._pending = self._pending, None
        work.wait()
        return _decision(buffer)

    def after_step(self, *, diverged: bool = False) -> Decision:
        """The decision after a step (``diverged``: this rank saw a non-finite loss)."""
        if self._group is None:
            return self._local(diverged)
        return self._exchange(self._local(diverged), wait=False)

    def at_epoch_end(self, *, diverged: bool = False) -> Decision:
        """The decision at an epoch's end (after its last step; again after its checkpoint).

        With several ranks: the pending exchange and one more, both waited for, so nothing
        sent before is left for later. Never a timed checkpoint: the epoch's end writes one.
        """
        if self._group is None:
            return Decision(stop=self.signals.received is not None, diverged=diverged)
        earlier = self._drain()
        now = self._exchange(
            Decision(stop=self.signals.received is not None, diverged=diverged), wait=True
        )
        return Decision(
            stop=earlier.stop or now.stop,
            checkpoint=False,  # the epoch's end writes a checkpoint anyway
            diverged=earlier.diverged or now.diverged,
        )


def _decision(buffer: torch.Tensor) -> Decision:
    values = buffer.tolist()  # a CPU tensor of the Gloo group: no device involved
    return Decision(**{name: bool(v) for name, v in zip(_FLAGS, values, strict=True)})
