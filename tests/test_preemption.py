"""Interrupted runs, as a cluster interrupts them, end bitwise where uninterrupted ones end.

Each run is ``python -m fastkd.train`` (or torchrun) in a session of its own, like a job step.
Signals go to every process of it, as SLURM sends them to every process of a step: the
DataLoader's worker processes and, under torchrun, the launcher and its workers, which then get
a SIGTERM twice (SLURM's and torchrun's forwarded one).

- SIGTERM in the middle of epoch 2: the run finishes its step, writes last.pt with the exact
  position and exits with 75 within a step; the same command continues it.
- Then, resumed, SIGKILL right after a checkpoint written inside epoch 3
  (``train.checkpoint_minutes`` tiny, so one is written after almost every step, and the kill may
  land during a write); the same command continues again.

The epoch records the resumed runs write (from the loss sums saved inside the epoch, every
rank's) are the uninterrupted run's too.

In deterministic mode on the CPU, with one intra-op thread in every run, the resumed run's final
weights equal the uninterrupted run's bitwise, for the DALI and the torch backend and for 2
torchrun processes (Gloo).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fastkd import checkpoint as ckpt_io
from fastkd.errors import EXIT_PREEMPTED
from fastkd.logging import read_metrics

REPO = Path(__file__).resolve().parent.parent
EPOCHS, BATCH = 3, 2
STEPS = 24 // BATCH  # the tiny set's 24 training images: 12 steps an epoch (6 on each of 2 ranks)
SIGNAL_AT = 2  # the step of epoch 2 after which the signal is sent


def write_config(tmp_path: Path, root: Path, backend: str, name: str) -> Path:
    """A deterministic CPU WSLD run of EPOCHS epochs with a log record after every step."""
    tree = {
        "run": {"dir": str(tmp_path / name), "seed": 3, "deterministic": True, "resume": "auto"},
        "data": {
            "root": str(root),
            "backend": backend,
            "image_size": 32,
            "val_resize": 36,
            "batch_size": BATCH,
            "workers": 1,  # a DataLoader worker process (torch) / a DALI thread
        },
        # Small networks (about 50 ms a step here); the student's classifier has dropout, which
        # draws from torch's generator: the resumed run must continue its stream exactly.
        "teacher": {"arch": "mobilenet_v3_small", "weights": "random"},
        "student": {"arch": "mobilenet_v3_small"},
        "loss": {"kind": "wsld"},
        "optim": {"lr": 0.01},
        "sched": {"kind": "cosine", "warmup_epochs": 0.5},
        "train": {
            "epochs": EPOCHS,
            "device": "cpu",
            "compile": False,
            "amp": "off",
            "log_every": 1,
            "checkpoint_minutes": 0,
        },
    }
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config


def launch(config: Path, *overrides: str, ranks: int = 1) -> subprocess.Popen[str]:
    """``python -m fastkd.train`` (or torchrun with ``ranks`` processes) in a new session."""
    train = ["-m", "fastkd.train", "--config", str(config), *overrides]
    if ranks > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        command = [torchrun, "--standalone", "--nproc_per_node", str(ranks), *train]
    else:
        command = [sys.executable, *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: signalled as a whole, like a job step
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


def wait_until(proc: subprocess.Popen[str], ready, what: str, timeout: float = 300) -> Any:
    """Poll ``ready()`` until it returns something truthy; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as far as it is written (the run may be in the middle of a line)."""
    try:
        return read_metrics(run_dir)
    except ValueError:
        return []


def step_reached(run_dir: Path, epoch: int, step: int):
    def ready() -> int | None:
        for record in reversed(records(run_dir)):
            if record["event"] == "step" and record["epoch"] == epoch and record["step"] >= step:
                return record["step"]
        return None

    return ready


def checkpoint_inside(run_dir: Path, epoch: int):
    """Ready once a checkpoint inside ``epoch`` was written (its metrics record follows it)."""

    def ready() -> dict[str, Any] | None:
        for record in reversed(records(run_dir)):
            if record["event"] == "checkpoint" and record["epoch"] == epoch - 1:
                return record if record["step"] > 0 else None
        return None

    return ready


def assert_same_weights(run_dir: Path, reference_dir: Path, steps: int = STEPS) -> None:
    got = torch.load(run_dir / "student.pt", weights_only=True)
    want = torch.load(reference_dir / "student.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the uninterrupted run"
    got, want = (ckpt_io.load_checkpoint(d / "last.pt") for d in (run_dir, reference_dir))
    for index, state in want["optimizer"]["state"].items():
        assert torch.equal(
            got["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]
        )
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == EPOCHS * steps


def epoch_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["epoch"]: r for r in read_metrics(run_dir) if r["event"] == "epoch"}


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def signal_job(proc: subprocess.Popen[str], signum: int) -> None:
    """``signum`` to every process of the run, as SLURM signals a job step's processes (torchrun
    then forwards it to its workers: they get it twice)."""
    targets = descendants(proc.pid)
    os.killpg(proc.pid, signum)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def sigterm_mid_epoch(config: Path, run_dir: Path, ranks: int = 1) -> dict[str, Any]:
    """Run ``config``, SIGTERM all its processes at step SIGNAL_AT of epoch 2; checks the exit
    and returns the checkpoint it left."""
    proc = launch(config, ranks=ranks)
    seen = wait_until(proc, step_reached(run_dir, 2, SIGNAL_AT), f"epoch 2 step {SIGNAL_AT}")
    signal_job(proc, signal.SIGTERM)
    signalled = time.monotonic()
    code, err = finish(proc, timeout=120)
    if ranks == 1:  # torchrun itself exits 1 when a worker does not exit 0: status.json says why
        assert code == EXIT_PREEMPTED, err[-3000:]
        assert "stopped by SIGTERM" in err and "run.resume=auto" in err, err[-3000:]
    assert time.monotonic() - signalled < 60, "the run did not stop promptly"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["exit_code"] == EXIT_PREEMPTED, status
    saved = ckpt_io.load_checkpoint(run_dir / "last.pt")
    assert saved["reason"] == "preempted"
    assert saved["epoch"] == 1, "the stop should fall inside epoch 2"
    # The step in flight when the signal came, at most one more (the record lags its step).
    assert seen <= saved["step"] <= seen + 2, (seen, saved["step"])
    steps_per_rank = STEPS // ranks
    assert 0 < saved["step"] < steps_per_rank
    assert saved["global_step"] == steps_per_rank + saved["step"]
    return saved


def sigkill_after_a_checkpoint_in_epoch_3(config: Path, run_dir: Path, ranks: int = 1) -> None:
    """Continue the run with a timed checkpoint after (almost) every step and SIGKILL all its
    processes right after one written inside epoch 3 (the kill may land during the next write)."""
    proc = launch(config, "train.checkpoint_minutes=0.0001", ranks=ranks)
    written = wait_until(proc, checkpoint_inside(run_dir, 3), "a checkpoint inside epoch 3")
    signal_job(proc, signal.SIGKILL)
    finish(proc)
    assert written["reason"] == "timed"
    saved = ckpt_io.load_checkpoint(run_dir / "last.pt")  # that one, or the next if complete
    assert saved["epoch"] == 2 and saved["step"] >= written["step"]


def assert_same_epoch_records(run_dir: Path, reference_dir: Path) -> None:
    """The epoch records the resumed runs wrote (epoch 2's and 3's from the sums saved inside
    them, every rank's) are the uninterrupted run's."""
    want, got = epoch_records(reference_dir), epoch_records(run_dir)
    assert sorted(got) == [1, 2, 3]
    for epoch, record in got.items():
        diagnostics = ("w_mean", "w_p10", "w_p50", "w_p90", "reg_frac", "w_reg", "w_rest")
        for key in ("loss", "ce", "wsld", "train_top1", "top1", "val_loss", *diagnostics):
            assert record[key] == want[epoch][key], (epoch, key, record[key], want[epoch][key])
        assert record["teacher_train_top1"] == want[epoch]["teacher_train_top1"], epoch


def interrupted_twice_then_finished(config: Path, run_dir: Path) -> None:
    """SIGTERM mid-epoch 2, resume, SIGKILL after a checkpoint inside epoch 3, resume."""
    sigterm_mid_epoch(config, run_dir)
    sigkill_after_a_checkpoint_in_epoch_3(config, run_dir)
    code, err = finish(launch(config))
    assert code == 0, err[-3000:]
    assert "resumed from" in err and "of epoch 3" in err, err[-3000:]


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bitwise_the_uninterrupted_run(
    tiny_imagefolder, tmp_path
):
    """Both backends at once (each process runs one intra-op thread; the machine may have 2
    cores), each beside its uninterrupted run, which is started first."""
    backends = ("dali", "torch")
    references = {
        b: launch(write_config(tmp_path, tiny_imagefolder, b, f"reference_{b}")) for b in backends
    }
    with concurrent.futures.ThreadPoolExecutor(len(backends)) as pool:
        runs = {
            b: pool.submit(
                interrupted_twice_then_finished,
                write_config(tmp_path, tiny_imagefolder, b, f"run_{b}"),
                tmp_path / f"run_{b}",
            )
            for b in backends
        }
        for backend, run in runs.items():
            try:
                run.result()
            except BaseException as exc:  # pytest's failures included: say which backend
                raise AssertionError(f"data.backend={backend}: {exc}") from exc
    for backend, proc in references.items():
        code, err = finish(proc)
        assert code == 0, f"data.backend={backend}: {err[-3000:]}"
    for backend in backends:
        run_dir, reference_dir = tmp_path / f"run_{backend}", tmp_path / f"reference_{backend}"
        assert_same_weights(run_dir, reference_dir)
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
        assert not list(run_dir.glob(".*.tmp*")), "a stale temporary was left in the run folder"
        assert_same_epoch_records(run_dir, reference_dir)


@pytest.mark.slow
def test_torchrun_two_ranks_sigterm_then_sigkill_then_resume_is_bitwise(tiny_imagefolder, tmp_path):
    reference_config = write_config(tmp_path, tiny_imagefolder, "torch", "reference")
    reference = launch(reference_config, ranks=2)  # alongside the interrupted run
    config = write_config(tmp_path, tiny_imagefolder, "torch", "run")
    run_dir = tmp_path / "run"
    sigterm_mid_epoch(config, run_dir, ranks=2)
    code, err = finish(reference)
    assert code == 0, err[-3000:]
    sigkill_after_a_checkpoint_in_epoch_3(config, run_dir, ranks=2)

    code, err = finish(launch(config, ranks=2))
    assert code == 0, err[-3000:]
    assert_same_weights(run_dir, tmp_path / "reference", steps=STEPS // 2)
    assert_same_epoch_records(run_dir, tmp_path / "reference")
