"""Stop and checkpoint decisions between steps (`fastkd.control`), in a world of one.

Real signals are sent to this process (the handlers are installed in the main thread, as the
trainer does) or, for the "second signal exits at once" case that kills its process, to a child.
Several ranks are covered end to end by tests/test_preemption.py (torchrun, Gloo).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastkd.control import Decision, RunControl, StopSignals
from fastkd.distributed import DistInfo
from fastkd.errors import Preempted

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_a_request_and_the_handlers_are_put_back(signum):
    before = signal.getsignal(signum)
    with StopSignals() as signals:
        signals.defer()  # training runs: a signal is a request
        assert signals.received is None
        os.kill(os.getpid(), signum)  # delivered to the main thread before the next bytecode
        assert signals.received == signal.Signals(signum).name
        control = RunControl(ONE, signals, checkpoint_minutes=0)
        assert control.after_step() == Decision(stop=True)
    assert signal.getsignal(signum) is before


def test_a_signal_before_training_starts_stops_at_once():
    """During setup there is no step to finish: the signal raises Preempted right away."""
    with StopSignals() as signals, pytest.raises(Preempted, match="before training started"):
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received == "SIGTERM"


def test_a_relayed_signal_is_the_same_request_and_a_later_one_exits_at_once(tmp_path):
    """torchrun forwards the SIGTERM SLURM also sent each worker: one request. A second signal
    later than StopSignals.SAME_REQUEST_S kills the process by that signal, no checkpoint."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from fastkd.control import StopSignals

        now = [0.0]
        with StopSignals(clock=lambda: now[0]) as signals:
            signals.defer()
            os.kill(os.getpid(), signal.SIGTERM)
            now[0] = 0.5
            os.kill(os.getpid(), signal.SIGTERM)  # relayed: ignored
            print("still running after the relayed signal", signals.received, flush=True)
            now[0] = 0.5 + StopSignals.SAME_REQUEST_S
            os.kill(os.getpid(), signal.SIGINT)  # a second request: dies by SIGINT here
            print("not reached", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "still running after the relayed signal SIGTERM" in result.stdout
    assert "not reached" not in result.stdout
    assert result.returncode == -signal.SIGINT, result.stderr
    assert "exiting at once, without a checkpoint" in result.stderr


def test_timed_checkpoints_follow_the_clock_and_restart_after_each_save():
    clock = Clock()
    control = RunControl(ONE, StopSignals(), checkpoint_minutes=2, clock=clock)
    clock.now += 119
    assert control.after_step() == Decision()
    clock.now += 1
    assert control.after_step() == Decision(checkpoint=True)
    assert control.after_step() == Decision()  # the decision itself restarted the clock
    clock.now += 100
    control.checkpointed()  # an epoch's end saved: the next timed one is 2 minutes later
    clock.now += 119
    assert control.after_step() == Decision()
    clock.now += 1
    assert control.at_epoch_end() == Decision()  # an epoch's end writes a checkpoint anyway
    assert control.after_step() == Decision(checkpoint=True)


def test_no_timed_checkpoints_with_zero_minutes_and_divergence_is_passed_on():
    clock = Clock()
    control = RunControl(ONE, StopSignals(), checkpoint_minutes=0, clock=clock)
    clock.now += 10**6
    assert control.after_step() == Decision()
    assert control.after_step(diverged=True) == Decision(diverged=True)
    assert control.at_epoch_end(diverged=True) == Decision(diverged=True)


class FakeGroup:
    """Stands in for the Gloo group: a max-reduce with another rank whose flags are
    ``other`` (assigned by the test), completed when waited for; counts the exchanges."""

    def __init__(self) -> None:
        self.other = [0.0, 0.0, 0.0]
        self.exchanges = 0

    def all_reduce(self, buffer, op, group, async_op):
        assert group is self and async_op
        self.exchanges += 1
        other = torch.tensor(self.other)

        class Work:
            def wait(self):
                torch.maximum(buffer, other, out=buffer)

        return Work()


@pytest.fixture
def two_ranks(monkeypatch):
    group = FakeGroup()
    monkeypatch.setattr("fastkd.control.control_group", lambda: group)
    monkeypatch.setattr("fastkd.control.tdist.all_reduce", group.all_reduce)
    return group


def test_with_several_ranks_each_decision_lags_one_step_and_is_taken_once(two_ranks):
    clock = Clock()
    rank0 = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    signals = StopSignals()
    control = RunControl(rank0, signals, checkpoint_minutes=1, clock=clock)
    assert control.after_step() == Decision()  # nothing sent before the first step
    clock.now += 60
    assert control.after_step() == Decision()  # due now: sent, answered after the next step
    clock.now += 20
    assert control.after_step() == Decision(checkpoint=True)
    clock.now += 20
    assert control.after_step() == Decision()  # not asked twice while the answer travelled
    assert control.after_step() == Decision()
    two_ranks.other = [0.0, 0.0, 1.0]  # the other rank saw a non-finite loss at this step
    assert control.after_step() == Decision()
    two_ranks.other = [0.0, 0.0, 0.0]
    assert control.after_step() == Decision(diverged=True)
    two_ranks.other = [1.0, 0.0, 0.0]  # the other rank got a signal while this one did not
    assert control.at_epoch_end() == Decision(stop=True)  # drained and exchanged, not lagging
    assert control._pending is None
    two_ranks.other = [0.0, 1.0, 0.0]  # a timed checkpoint is never asked at an epoch's end
    assert control.at_epoch_end() == Decision()


def test_under_torchrun_without_the_control_group_is_refused(monkeypatch):
    monkeypatch.setattr("fastkd.control.control_group", lambda: None)
    rank1 = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="init_distributed"):
        RunControl(rank1, StopSignals(), checkpoint_minutes=0)
