"""The training loop's meter on its own: which steps it logs, what it leaves out of images/sec,
and the epoch means it returns, with a fake clock so every number is exact."""

from __future__ import annotations

import pytest
import torch

from fastkd import meter as meter_module
from fastkd.distributed import DistInfo
from fastkd.logging import MetricsWriter, read_metrics
from fastkd.meter import TrainMeter

CPU = torch.device("cpu")
BATCH = 4


class Clock:
    """``time.perf_counter`` that advances only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(meter_module.time, "perf_counter", fake)
    return fake


def make_meter(tmp_path, *, log_every: int, flops: float | None = None) -> TrainMeter:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.25)
    return TrainMeter(
        MetricsWriter(tmp_path, tensorboard=False),
        optimizer=optimizer,
        dist=DistInfo(rank=0, world_size=2, local_rank=0, device=CPU),
        log_every=log_every,
        compiled=False,
        flops_per_image=flops,
        peak_flops=1e9 if flops else None,
    )


def step(
    meter: TrainMeter,
    clock: Clock,
    *,
    loss: float,
    correct: int,
    seconds: float,
    wait_s: float = 0.0,
    excluded: bool = False,
    global_step: int = 0,
) -> None:
    with meter.waiting():
        clock.now += wait_s
    clock.now += seconds - wait_s
    labels = torch.zeros(BATCH, dtype=torch.int64)
    logits = torch.zeros(BATCH, 3)
    logits[:correct, 0] = 1.0  # the first `correct` rows predict label 0
    logits[correct:, 1] = 1.0
    terms = {"loss": torch.tensor(loss), "ce": torch.tensor(loss / 2)}
    meter.update(terms, logits, labels, global_step=global_step, excluded=excluded)


def test_compile_step_and_excluded_steps_stay_out_of_images_per_second(tmp_path, clock):
    meter = make_meter(tmp_path, log_every=2, flops=1e6)
    meter.start_epoch(1, epochs=3, steps=6)
    step(meter, clock, loss=9.0, correct=0, seconds=30.0)  # compiles: reported, not timed
    assert meter.compile_time_s == pytest.approx(30.0)
    with pytest.warns(UserWarning, match="data-bound"):  # logs, half of it waiting for data
        step(meter, clock, loss=1.0, correct=4, seconds=1.0, wait_s=0.5, global_step=2)
    step(meter, clock, loss=1.0, correct=4, seconds=5.0, excluded=True)  # profiled: left out
    step(meter, clock, loss=1.0, correct=4, seconds=1.0, global_step=4)  # logs (step 4)
    step(meter, clock, loss=1.0, correct=2, seconds=1.0)
    step(meter, clock, loss=3.0, correct=2, seconds=1.0, global_step=6)  # the last step logs
    result = meter.end_epoch()
    meter.metrics.close()

    records = read_metrics(tmp_path)
    assert [r["event"] for r in records] == ["compile", "step", "step", "step"]
    assert records[0]["seconds"] == 30.0
    steps = records[1:]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert [r["global_step"] for r in steps] == [2, 4, 6]
    # Interval images x world size / interval seconds; the excluded step restarted the interval.
    assert [r["img_per_s"] for r in steps] == pytest.approx([8.0, 8.0, 8.0])
    assert steps[0]["data_wait_frac"] == pytest.approx(0.5)
    assert steps[0]["lr"] == 0.25
    assert steps[0]["mfu"] == pytest.approx(4.0 * 1e6 / 1e9)
    # Running means over every step of the epoch so far, the compile step included.
    assert steps[0]["loss"] == pytest.approx(5.0) and steps[0]["ce"] == pytest.approx(2.5)
    assert steps[2]["loss"] == pytest.approx(16 / 6)
    # Epoch: 4 timed steps (not the compile or profiled one) in 4 s, 4 images each, 2 ranks.
    assert result["img_per_s"] == pytest.approx(4 * BATCH * 2 / 4.0)
    assert result["loss"] == pytest.approx(16 / 6)
    assert result["train_top1"] == pytest.approx((0 + 4 + 4 + 4 + 2 + 2) / 24)
    assert result["epoch_time_s"] == pytest.approx(39.0)


def test_compile_is_reported_once_per_run_and_a_data_bound_run_warns_once(tmp_path, clock):
    meter = make_meter(tmp_path, log_every=1)
    meter.start_epoch(1, epochs=2, steps=2)
    step(meter, clock, loss=1.0, correct=1, seconds=2.0)
    with pytest.warns(UserWarning, match="data-bound: 80%"):
        step(meter, clock, loss=1.0, correct=1, seconds=1.0, wait_s=0.8)
    meter.end_epoch()
    meter.start_epoch(2, epochs=2, steps=2)
    step(meter, clock, loss=1.0, correct=1, seconds=1.0, wait_s=0.9)  # no second warning
    step(meter, clock, loss=1.0, correct=1, seconds=1.0)
    result = meter.end_epoch()
    meter.metrics.close()
    events = [r["event"] for r in read_metrics(tmp_path)]
    assert events == ["compile", "step", "step", "step"]
    assert result["img_per_s"] == pytest.approx(BATCH * 2 * 2 / 2.0)


def test_a_one_step_epoch_reports_its_only_step(tmp_path, clock):
    meter = make_meter(tmp_path, log_every=50)
    meter.start_epoch(1, epochs=1, steps=1)
    step(meter, clock, loss=2.0, correct=4, seconds=4.0)
    result = meter.end_epoch()
    meter.metrics.close()
    assert result["img_per_s"] == pytest.approx(BATCH * 2 / 4.0)
    assert result["train_top1"] == 1.0


def test_an_epoch_resumed_mid_way_continues_its_sums_or_counts_from_the_resume(tmp_path, clock):
    """A checkpoint inside an epoch holds the meter's sums: the resumed epoch's means and step
    labels are the uninterrupted epoch's. Without them (the steps per epoch changed), the
    labels still follow the epoch and the means cover the steps since the resume."""
    whole = make_meter(tmp_path / "whole", log_every=3)
    whole.start_epoch(1, 1, 6)
    for i in range(6):
        step(whole, clock, loss=float(i), correct=i % 3, seconds=1.0, global_step=i + 1)
        if i == 3:
            saved = whole.state_dict()
    expected = whole.end_epoch()

    resumed = make_meter(tmp_path / "resumed", log_every=3)
    resumed.compile_time_s = 0.0  # the warm-up step was the interrupted run's
    resumed.start_epoch(1, 1, 6, start=4, resume=saved)
    for i in (4, 5):
        step(resumed, clock, loss=float(i), correct=i % 3, seconds=1.0, global_step=i + 1)
    got = resumed.end_epoch()
    for key in ("loss", "ce", "train_top1"):
        assert got[key] == expected[key], key
    logged = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")]
    assert logged == [(6, pytest.approx(2.5))]

    fresh = make_meter(tmp_path / "fresh", log_every=3)
    fresh.compile_time_s = 0.0
    fresh.start_epoch(1, 1, 6, start=4)
    for i in (4, 5):
        step(fresh, clock, loss=float(i), correct=0, seconds=1.0, global_step=i + 1)
    assert fresh.end_epoch()["loss"] == 4.5
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "fresh")] == [(6, 4.5)]


def test_a_non_finite_loss_is_found_at_the_next_read_with_its_step_and_terms(tmp_path, clock):
    meter = make_meter(tmp_path, log_every=4)
    meter.start_epoch(2, 3, 8)
    for i in range(8):
        loss = float("inf") if i in (5, 6) else 1.0
        step(meter, clock, loss=loss, correct=1, seconds=1.0, global_step=8 + i + 1)
        assert (meter.nonfinite is None) == (i < 7), i  # the read at step 8 finds step 6
    found = meter.nonfinite
    assert (found.epoch, found.step, found.global_step) == (2, 6, 14)
    assert found.terms == {"loss": float("inf"), "ce": float("inf")}
    assert found.describe(8) == "epoch 2 step 6/8 (global step 14): loss inf (ce inf)"


def test_an_epoch_resumed_after_its_last_step_reports_no_speed(tmp_path, clock):
    """Stopped after an epoch's last step, the resumed run runs none of it: its record keeps the
    saved sums and reports images/sec as unknown (NaN), not the whole epoch over ~0 s."""
    whole = make_meter(tmp_path / "whole", log_every=3)
    whole.start_epoch(1, 1, 3)
    for i in range(3):
        step(whole, clock, loss=1.0 + i, correct=1, seconds=1.0, global_step=i + 1)
    saved = whole.state_dict()
    resumed = make_meter(tmp_path / "resumed", log_every=3)
    resumed.start_epoch(1, 1, 3, start=3, resume=saved)
    result = resumed.end_epoch()
    assert result["loss"] == 2.0 and result["train_top1"] == 0.25
    assert result["img_per_s"] != result["img_per_s"]  # NaN
