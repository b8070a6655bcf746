"""A diverging run stops with one message naming where, and never writes non-finite weights.

The loss is read at log lines only (tests/test_sync.py): a non-finite loss is found at the first
log line after it, which names its epoch, step and terms. The checkpoint written before it stays
as it was (and loads, finite); weights that became non-finite while the loss still looked
finite (non-finite gradients without a grad scaler) are caught before any checkpoint write.
Under fp16 loss scaling a step with non-finite gradients is skipped by the scaler and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastkd.builders as builders
import fastkd.trainer as trainer_module
from fastkd import checkpoint as ckpt_io
from fastkd import engine
from fastkd.builders import build_models, build_train_state
from fastkd.config import from_dict
from fastkd.distributed import DistInfo
from fastkd.errors import EXIT_DIVERGED, Diverged
from fastkd.logging import MetricsWriter, read_metrics
from fastkd.train import main

pytestmark = pytest.mark.filterwarnings("ignore:training is data-bound")


def tree(root: Path, run_dir: Path, **train) -> dict:
    return {
        "run": {"dir": str(run_dir), "seed": 0, "resume": "auto"},
        "data": {
            "root": str(root),
            "backend": "torch",
            "image_size": 16,
            "val_resize": 18,
            "batch_size": 4,  # 24 images: 6 steps an epoch
            "workers": 0,
        },
        "student": {"arch": "shufflenet_v2_x0_5"},
        "loss": {"kind": "ce"},
        "optim": {"lr": 0.05},
        "sched": {"kind": "constant"},
        "train": {
            "epochs": 3,
            "device": "cpu",
            "compile": False,
            "amp": "off",
            "log_every": 4,
            "checkpoint_minutes": 0,
            **train,
        },
    }


def poison_loss_at(monkeypatch: pytest.MonkeyPatch, global_step: int) -> None:
    """The objective's loss becomes NaN at ``global_step`` (1-based), as a diverging run's does."""
    real = builders.build_objective
    calls = [0]

    def build_objective(cfg, **options):
        objective = real(cfg, **options)

        def poisoned(student_logits, teacher_logits, labels):
            calls[0] += 1
            total, terms = objective(student_logits, teacher_logits, labels)
            if calls[0] == global_step:
                total = total * float("nan")
                terms = {**terms, "loss": total.detach(), "ce": total.detach()}
            return total, terms

        return poisoned

    monkeypatch.setattr(builders, "build_objective", build_objective)


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(
    tiny_imagefolder, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    poison_loss_at(monkeypatch, global_step=6 + 2)  # epoch 2, step 2: found at step 4's line
    with pytest.raises(Diverged) as raised:
        trainer_module.run(from_dict(tree(tiny_imagefolder, run_dir)))
    message = str(raised.value)
    assert (
        "the loss is not finite at epoch 2 step 2/6 (global step 8): loss nan (ce nan)" in message
    )
    assert "last.pt (the end of epoch 1) was kept" in message and "optim.lr" in message

    saved = ckpt_io.load_checkpoint(run_dir / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 0)
    assert finite(saved["student"])
    assert finite(ckpt_io.load_checkpoint(run_dir / "best.pt")["student"])
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "diverged" and status["exit_code"] == EXIT_DIVERGED
    # Found at the log line of step 4, the first read after the NaN: nothing later ran.
    steps = [(r["epoch"], r["step"]) for r in read_metrics(run_dir) if r["event"] == "step"]
    assert steps[-1] == (2, 4)


def test_an_obviously_diverging_lr_ends_within_the_first_epoch(tiny_imagefolder, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(tree(tiny_imagefolder, tmp_path / "run")))  # YAML reads JSON
    assert main(["--config", str(config), "optim.lr=1.0e+30"]) == EXIT_DIVERGED
    err = capsys.readouterr().err
    line = [text for text in err.splitlines() if text.startswith("fastkd: error:")]
    assert len(line) == 1 and "training diverged" in line[0] and "epoch 1 step" in line[0], err
    assert "no checkpoint was written" in line[0]
    records = read_metrics(tmp_path / "run")
    assert not [r for r in records if r["event"] == "epoch"], "an epoch record after divergence"
    assert not (tmp_path / "run" / "last.pt").exists()


def test_non_finite_weights_are_never_written(tiny_imagefolder, tmp_path, monkeypatch):
    """Gradients that break the weights while the loss still looks finite (bf16 without a grad
    scaler): the save at the epoch's end finds it and keeps the previous checkpoint."""
    run_dir = tmp_path / "run"
    real_step = engine.train_step
    steps = [0]

    def train_step(state, images, labels):
        terms, logits = real_step(state, images, labels)
        steps[0] += 1
        if steps[0] == 12:  # epoch 2's last step: the loss was finite, the update was not
            with torch.no_grad():
                next(state.student.parameters()).fill_(float("inf"))
        return terms, logits

    monkeypatch.setattr(engine, "train_step", train_step)
    with pytest.raises(Diverged, match=r"the weights are not finite at the end of epoch 2"):
        trainer_module.run(from_dict(tree(tiny_imagefolder, run_dir)))
    saved = ckpt_io.load_checkpoint(run_dir / "last.pt")
    assert saved["epoch"] == 1 and finite(saved["student"])


class InfGradient(torch.autograd.Function):
    """Identity forward; an inf gradient backward (an fp16 overflow in the backward pass)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_fp16_skipped_steps_are_counted_not_fatal(tmp_path):
    cfg = from_dict(
        {
            "run": {"dir": str(tmp_path / "run")},
            "data": {"root": str(tmp_path), "batch_size": 4},
            "student": {"arch": "resnet18"},
            "loss": {"kind": "ce"},
            "sched": {"kind": "constant"},
            "train": {"epochs": 1, "compile": False, "log_every": 3, "amp": "off"},
        }
    )
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    # fp32 arithmetic with the fp16 path's grad scaler: its only skipped steps are the
    # injected ones (fp16 on the CPU also skips its first steps while the scale settles).
    fp16 = engine.Precision("fp32+scaler", None, use_scaler=True)
    models = build_models(cfg, 4, dist)
    metrics = MetricsWriter(tmp_path / "run")
    state = build_train_state(
        cfg, models, dist=dist, precision=fp16, steps_per_epoch=6, metrics=metrics
    )
    objective, calls = state.objective, [0]

    def overflowing(student_logits, teacher_logits, labels):
        calls[0] += 1
        if calls[0] in (2, 5):
            student_logits = InfGradient.apply(student_logits)
        return objective(student_logits, teacher_logits, labels)

    state.objective = overflowing
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen), torch.arange(4)) for _ in range(6)]
    result = engine.train_one_epoch(state, batches, epoch=1, epochs=1, steps=6)
    metrics.close()
    assert state.meter.nonfinite is None
    assert result["skipped_steps"] == 2
    records = [r for r in read_metrics(tmp_path / "run") if r["event"] == "step"]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(3, 1), (6, 2)]
    assert all(torch.isfinite(p).all() for p in models.student.parameters())
