"""A resumed run continues every piece of training state exactly, the learning rate included.

The same tiny run is trained twice in this process: once straight through, once stopped after
``k`` epochs and resumed with ``run.resume=auto``. With ``run.deterministic=true``, the torch
backend and fp32 on the CPU, both follow one code path on one machine with one thread count, so
everything that continues correctly is bitwise equal: the learning rate of every logged step,
the loss terms, the optimizer's momentum buffers, the scheduler's position, the student's
weights and BatchNorm statistics. A resume that restarts the schedule, drops the momentum or
replays the wrong data order changes them at once.

Two ways a run gets resumed are covered: a run stopped by a crash or preemption (same config,
cosine schedule, whose curve depends on ``train.epochs``), and a finished run extended with a
larger ``train.epochs`` (step schedule, whose curve does not).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fastkd.trainer as train_module
from fastkd import checkpoint as ckpt_io
from fastkd import engine, resume
from fastkd.config import Config, from_dict, to_dict
from fastkd.errors import CheckpointError
from fastkd.logging import read_metrics
from fastkd.train import main

EPOCHS = 3
# Warm-up ends inside epoch 1 (3 steps an epoch: 24 images, batch 8), so the learning rate
# changes at every step of the cosine run and at every epoch of the step run.
SCHEDULES = {
    "cosine": {"kind": "cosine", "min_lr": 0.001, "warmup_epochs": 0.5},
    "step": {"kind": "step", "milestones": [1, 2], "gamma": 0.5, "warmup_epochs": 0.5},
}


class Preempted(RuntimeError):
    """Stands in for a killed job: raised as the epoch after the last checkpoint starts."""


@pytest.fixture
def torch_process_state():
    """One intra-op thread for these runs, and the process-wide flags put back afterwards.

    ``run.deterministic`` sets process-wide torch flags. One thread: on these tiny tensors
    OpenMP's thread synchronization costs more than it saves, and on a busy 2-core machine a
    second spinning thread made one run take 20 s instead of 1 s. Both runs of a comparison
    use the same count, so bitwise equality does not depend on it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def make_config(root: Path, run_dir: Path, schedule: str, epochs: int) -> Config:
    """A tiny deterministic CPU run (3 steps an epoch)."""
    return from_dict(
        {
            "run": {"dir": str(run_dir), "seed": 0, "deterministic": True, "resume": "auto"},
            "data": {
                "root": str(root),
                "backend": "torch",
                "image_size": 16,
                "val_resize": 18,
                "batch_size": 8,
                "workers": 0,
            },
            "teacher": {"arch": "resnet18", "weights": "random"},
            # A small BatchNorm network without dropout (dropout would draw from the global
            # random generator, whose state checkpoints do not hold).
            "student": {"arch": "shufflenet_v2_x0_5"},
            "loss": {"kind": "ce"},
            "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
            "sched": SCHEDULES[schedule],
            "train": {
                "epochs": epochs,
                "device": "cpu",
                "compile": False,
                "amp": "off",
                "log_every": 1,
            },
        }
    )


@contextlib.contextmanager
def logged() -> Iterator[list[str]]:
    """The fastkd logger's messages (it does not propagate to pytest's capture)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("fastkd")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def run_until_preempted(cfg: Config, after_epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train per ``cfg`` and stop as epoch ``after_epoch + 1`` starts (its checkpoint saved)."""
    real = train_module.train_one_epoch

    def train_one_epoch(state, loader, epoch, epochs, steps, **kwargs):
        if epoch > after_epoch:
            raise Preempted(f"stopped before epoch {epoch}")
        return real(state, loader, epoch, epochs, steps, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_one_epoch", train_one_epoch)
        with pytest.raises(Preempted):
            train_module.run(cfg)


def records_of_last_start(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics records written by the last ``run()`` into ``run_dir`` (the file appends)."""
    records = read_metrics(run_dir)
    starts = [i for i, r in enumerate(records) if r["event"] == "start"]
    return records[starts[-1] :]


def step_records(records: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["epoch"], r["step"]): r for r in records if r["event"] == "step"}


def assert_tensors_equal(actual: Any, expected: Any, where: str) -> None:
    """Nested dicts / lists of tensors and plain values, tensors compared bitwise."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), f"{where}: max |diff| " + str(
            (actual.double() - expected.double()).abs().max().item()
        )
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_tensors_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_tensors_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


# A tiny network on 16 px images reading JPEGs in the main process is always data-bound.
@pytest.mark.filterwarnings("ignore:training is data-bound")
@pytest.mark.parametrize(
    ("how", "schedule", "resume_after"),
    [
        ("preempted", "cosine", 1),
        ("preempted", "cosine", 2),
        ("extended", "step", 1),
    ],
)
def test_resumed_run_continues_every_piece_of_state(
    how, schedule, resume_after, tiny_imagefolder, tmp_path, monkeypatch, torch_process_state
):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train_module.run(make_config(tiny_imagefolder, straight_dir, schedule, EPOCHS))

    if how == "preempted":  # the same config throughout, the job killed after epoch k
        cfg = make_config(tiny_imagefolder, resumed_dir, schedule, EPOCHS)
        run_until_preempted(cfg, resume_after, monkeypatch)
    else:  # a run of k epochs, finished, then extended to EPOCHS with the same run.dir
        train_module.run(make_config(tiny_imagefolder, resumed_dir, schedule, resume_after))
        cfg = make_config(tiny_imagefolder, resumed_dir, schedule, EPOCHS)
    assert ckpt_io.load_checkpoint(resumed_dir / "last.pt")["epoch"] == resume_after
    resumed = train_module.run(cfg)

    # The second run did resume, and trained exactly the remaining epochs.
    after = records_of_last_start(resumed_dir)
    assert after[0]["resumed_from"] == str(resumed_dir / "last.pt")
    assert [r["epoch"] for r in after if r["event"] == "epoch"] == list(
        range(resume_after + 1, EPOCHS + 1)
    )

    # The learning rate (and the loss terms, step count) of every step logged after the resume.
    # The resumed run's first step is its warm-up step, which is reported apart, not logged.
    reference = step_records(read_metrics(straight_dir))
    continued = step_records(after)
    steps_per_epoch = max(step for _, step in reference)
    expected_keys = {
        (epoch, step)
        for epoch in range(resume_after + 1, EPOCHS + 1)
        for step in range(1, steps_per_epoch + 1)
    } - {(resume_after + 1, 1)}
    assert set(continued) == expected_keys
    compared = ("lr", "global_step", "loss", "ce")
    for key in sorted(expected_keys):
        for name in compared:
            assert continued[key][name] == reference[key][name], (key, name)
    lrs = [continued[key]["lr"] for key in sorted(continued)]
    assert len(set(lrs)) > 1, "the schedule must change after the resume for this test to bite"

    # Epoch results after the resume: training loss and accuracy, validation accuracy and loss.
    reference_epochs = {r["epoch"]: r for r in read_metrics(straight_dir) if r["event"] == "epoch"}
    for record in (r for r in after if r["event"] == "epoch"):
        for name in ("loss", "train_top1", "top1", "top5", "val_loss"):
            assert record[name] == reference_epochs[record["epoch"]][name], (record["epoch"], name)

    # The final checkpoints: weights and BN statistics, momentum buffers, scheduler position.
    want = ckpt_io.load_checkpoint(straight_dir / "last.pt")
    got = ckpt_io.load_checkpoint(resumed_dir / "last.pt")
    assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == EPOCHS * 3
    momentum = [s["momentum_buffer"] for s in got["optimizer"]["state"].values()]
    assert momentum and all(m is not None and m.abs().sum() > 0 for m in momentum)
    # Only run.dir tells the two runs' configs apart; every other key of last.pt is equal.
    assert got["config"]["run"]["dir"] == str(resumed_dir)
    got["config"]["run"]["dir"] = want["config"]["run"]["dir"]
    assert_tensors_equal(got, want, "last.pt")
    # best.pt holds the best epoch so far; a resume that forgets best_top1 rewrites it.
    want_best = ckpt_io.load_checkpoint(straight_dir / "best.pt")
    got_best = ckpt_io.load_checkpoint(resumed_dir / "best.pt")
    for checkpoint in (want_best, got_best):
        del checkpoint["config"]  # run.dir, and train.epochs when saved by the shorter first run
    assert_tensors_equal(got_best, want_best, "best.pt")
    assert_tensors_equal(
        torch.load(resumed_dir / "student.pt", weights_only=True),
        torch.load(straight_dir / "student.pt", weights_only=True),
        "student.pt",
    )
    for name in ("top1", "top5", "best_top1", "num_val_images"):
        assert resumed[name] == straight[name], name


@pytest.mark.filterwarnings("ignore:training is data-bound")
def test_another_steps_per_epoch_continues_the_schedule_at_the_same_point(
    tiny_imagefolder, tmp_path, monkeypatch, torch_process_state
):
    """A run resumed on another GPU count (here: another batch size, 3 -> 6 steps an epoch)
    continues its schedule after the same fraction of training, and says so; restoring the old
    step count against the new epoch length would put it back at epoch 1's learning rate."""
    run_dir = tmp_path / "run"
    cfg = make_config(tiny_imagefolder, run_dir, "cosine", epochs=4)
    run_until_preempted(cfg, 2, monkeypatch)
    resumed = make_config(tiny_imagefolder, run_dir, "cosine", epochs=4)
    resumed.data.batch_size = 4
    with logged() as lines:
        train_module.run(resumed)
    text = "\n".join(lines)
    assert "this run has 6 steps per epoch, the checkpoint's had 3" in text
    assert "epoch 2 + 0/6 steps (global step 12, was 6)" in text
    steps = step_records(records_of_last_start(run_dir))
    assert min(r["global_step"] for r in steps.values()) == 2 * 6 + 2  # step 1: warm-up, unlogged
    for record in steps.values():
        factor = engine.lr_factor(
            record["global_step"],
            cfg=resumed.sched,
            base_lr=resumed.optim.lr,
            epochs=4,
            steps_per_epoch=6,
        )
        assert record["lr"] == pytest.approx(resumed.optim.lr * factor, rel=1e-12)
    assert ckpt_io.load_checkpoint(run_dir / "last.pt")["scheduler"]["last_epoch"] == 4 * 6


def test_a_position_inside_an_epoch_maps_to_the_same_fraction():
    saved = {"epoch": 5, "step": 30, "steps_per_epoch": 40, "global_step": 230}
    assert resume._position(saved, 80) == (resume.Position(5, 60, None), True)
    assert resume._position(saved, 40)[0] == resume.Position(5, 30, None)
    # A version-1 checkpoint (epoch ends only) knows its steps per epoch from its schedule.
    old = {"epoch": 40, "scheduler": {"last_epoch": 40 * 625}}
    assert resume.saved_steps_per_epoch(old, 1250) == 625
    assert resume._position(old, 1250) == (resume.Position(40, 0, None), True)


def test_a_checkpoint_of_another_run_is_one_line_naming_both_values(tiny_imagefolder, tmp_path):
    cfg = make_config(tiny_imagefolder, tmp_path / "run", "cosine", epochs=1)
    saved = {
        "config": {"student": {"arch": "resnet50"}, "loss": {"kind": "wsld"}, "run": {"seed": 0}},
        "classes": [str(i) for i in range(1000)],
    }
    with pytest.raises(CheckpointError) as raised:
        resume.check_compatible(saved, cfg, ["a", "b", "c", "d"], Path("x/last.pt"))
    message = str(raised.value)
    assert "\n" not in message
    for part in (
        "student.arch=resnet50 (this config: shufflenet_v2_x0_5)",
        "loss.kind=wsld (this config: ce)",
        "1000 classes (data.root has 4)",
        "config.yaml",
    ):
        assert part in message
    # The same class count with other folder names is another run too.
    same_count = {"config": to_dict(cfg), "classes": ["a", "b", "x", "d"]}
    with pytest.raises(CheckpointError, match=r"class 'x' where data.root has 'c'"):
        resume.check_compatible(same_count, cfg, ["a", "b", "c", "d"], Path("x/last.pt"))
    resume.check_compatible(
        {**same_count, "classes": ["a", "b", "c", "d"]}, cfg, list("abcd"), Path("p")
    )


@pytest.mark.filterwarnings("ignore:training is data-bound")
def test_resuming_another_architecture_from_the_command_line(
    tiny_imagefolder, tmp_path, torch_process_state, capsys
):
    run_dir = tmp_path / "run"
    train_module.run(make_config(tiny_imagefolder, run_dir, "cosine", epochs=1))
    config = tmp_path / "other.yaml"
    tree = to_dict(make_config(tiny_imagefolder, run_dir, "cosine", epochs=2))
    tree["student"]["arch"] = "resnet18"
    config.write_text(json.dumps(tree))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastkd: error: run.resume:"), err
    assert "student.arch=shufflenet_v2_x0_5 (this config: resnet18)" in err[-1]


def test_a_changed_schedule_is_said_on_resume(tiny_imagefolder, tmp_path):
    cfg = make_config(tiny_imagefolder, tmp_path / "run", "cosine", epochs=4)
    saved = {"config": to_dict(make_config(tiny_imagefolder, tmp_path / "run", "cosine", 3))}
    with logged() as lines:
        resume._warn_schedule_changes(saved, cfg)
        resume._warn_schedule_changes({"config": to_dict(cfg)}, cfg)  # unchanged: silent
    assert lines == [
        "warning: the schedule changed since the checkpoint (train.epochs 3 -> 4): the learning "
        "rate continues on the new schedule from this point"
    ]
