"""Learning-rate schedules over their whole curve: step, cosine and constant, with and without warm-up.

Every expected value is derived here from the schedule's definition, written in optimizer steps
(``lr_factor`` works in fractional epochs), and the key points are pinned by hand: the first
step, the end of warm-up, each milestone (the step before it and the step at it), the cosine
midpoint, the last step and beyond. ``lr_factor(k)`` is the multiplier of the learning rate that
optimizer step ``k`` (0-based) uses; ``lr_factor(epochs * steps_per_epoch)`` is the value after
the run's last step, where a cosine schedule has arrived at ``min_lr``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastkd.config import SchedConfig
from fastkd.engine import build_scheduler, lr_factor

# Factors are sums and products of a few floats: agreement to ~1e-15 relative is expected; any
# bug of interest (an off-by-one step, a wrong span) moves a value by far more than this.
REL = 1e-12
ABS = 1e-15


def expected_factor(
    step: int,
    *,
    kind: str,
    epochs: int,
    steps_per_epoch: int,
    base_lr: float = 0.1,
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.1,
) -> float:
    """The schedule's definition in steps: linear warm-up times the schedule proper.

    Warm-up rises linearly from ``warmup_start_factor`` at step 0 to 1 at step W =
    warmup_epochs * steps_per_epoch (possibly fractional) and is 1 from there on. The step
    schedule multiplies by ``gamma`` at the first step of each milestone epoch; the cosine one
    falls from 1 at step W to ``min_lr / base_lr`` at the last step T = epochs * steps_per_epoch
    and stays there.
    """
    warmup_steps = warmup_epochs * steps_per_epoch
    total_steps = epochs * steps_per_epoch
    warm = 1.0
    if step < warmup_steps:
        warm = warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    if kind == "step":
        passed = len([m for m in milestones if step >= m * steps_per_epoch])
        return warm * gamma**passed
    if kind == "cosine":
        floor = min_lr / base_lr
        if step <= warmup_steps:
            return warm  # the cosine has not started falling yet
        if step >= total_steps:
            return floor
        angle = math.pi * (step - warmup_steps) / (total_steps - warmup_steps)
        return floor + (1.0 - floor) * (1.0 + math.cos(angle)) / 2.0
    assert kind == "constant"
    return warm


def factors(cfg: SchedConfig, *, epochs: int, steps_per_epoch: int, base_lr: float = 0.1, extra=0):
    """``lr_factor`` at every step of the run, its end, and ``extra`` steps past the end."""
    return [
        lr_factor(step, cfg=cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
        for step in range(epochs * steps_per_epoch + 1 + extra)
    ]


def expected_curve(cfg: SchedConfig, *, epochs: int, steps_per_epoch: int, base_lr=0.1, extra=0):
    return [
        expected_factor(
            step,
            kind=cfg.kind,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            base_lr=base_lr,
            milestones=tuple(cfg.milestones),
            gamma=cfg.gamma,
            min_lr=cfg.min_lr,
            warmup_epochs=cfg.warmup_epochs,
            warmup_start_factor=cfg.warmup_start_factor,
        )
        for step in range(epochs * steps_per_epoch + 1 + extra)
    ]


# (kind, schedule keys, epochs, steps per epoch): every kind with and without warm-up, warm-up
# in whole and fractional epochs (ending between two steps too: 0.3 x 5 = 1.5 steps), and a
# milestone inside the warm-up.
CASES = [
    ("step", dict(milestones=[2, 4], gamma=0.1), 6, 5),
    ("step", dict(milestones=[2, 4], gamma=0.1, warmup_epochs=1), 6, 5),
    ("step", dict(milestones=[1, 3], gamma=0.5, warmup_epochs=1.5, warmup_start_factor=0.2), 5, 4),
    ("step", dict(milestones=[1], gamma=0.3, warmup_epochs=0.3), 3, 5),
    ("cosine", dict(min_lr=0.0), 5, 4),
    ("cosine", dict(min_lr=0.001), 5, 4),
    ("cosine", dict(min_lr=0.001, warmup_epochs=1), 5, 4),
    ("cosine", dict(min_lr=0.002, warmup_epochs=0.5, warmup_start_factor=0.25), 4, 6),
    ("cosine", dict(min_lr=0.001, warmup_epochs=0.3), 3, 5),
    ("constant", dict(), 3, 4),
    ("constant", dict(warmup_epochs=2), 3, 4),
    ("constant", dict(warmup_epochs=0.75, warmup_start_factor=0.5), 3, 4),
]
CASE_IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in keys.items())}" for kind, keys, _, _ in CASES]


@pytest.mark.parametrize(("kind", "keys", "epochs", "steps_per_epoch"), CASES, ids=CASE_IDS)
def test_whole_curve_matches_the_definition(kind, keys, epochs, steps_per_epoch):
    """Every step of the run, the step after the last one, and 7 steps past the end."""
    cfg = SchedConfig(kind=kind, **keys)
    actual = factors(cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, extra=7)
    expected = expected_curve(cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, extra=7)
    assert actual == pytest.approx(expected, rel=REL, abs=ABS)


def test_step_schedule_by_hand():
    """milestones [2, 4], gamma 0.1, one warm-up epoch from 0.25, 4 steps an epoch, 6 epochs."""
    cfg = SchedConfig(
        kind="step", milestones=[2, 4], gamma=0.1, warmup_epochs=1, warmup_start_factor=0.25
    )
    actual = factors(cfg, epochs=6, steps_per_epoch=4, extra=4)
    expected = (
        [0.25, 0.4375, 0.625, 0.8125]  # warm-up: 0.25 + 0.75 * k / 4
        + [1.0] * 4  # epoch 2: warm-up over, before the first milestone
        + [0.1] * 8  # epochs 3-4: from the first step of epoch 3 (step 8 = milestone 2)
        + [0.01] * 8  # epochs 5-6
        + [0.01] * 5  # the end (step 24) and past it: no further decay
    )
    assert actual == pytest.approx(expected, rel=REL, abs=ABS)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 0.5])
def test_step_milestones_switch_at_the_first_step_of_the_epoch(warmup_epochs):
    steps_per_epoch = 7
    cfg = SchedConfig(kind="step", milestones=[2, 3, 5], gamma=0.5, warmup_epochs=warmup_epochs)

    def f(step: int) -> float:
        return lr_factor(step, cfg=cfg, base_lr=0.1, epochs=6, steps_per_epoch=steps_per_epoch)

    for passed, milestone in enumerate(cfg.milestones):
        at = milestone * steps_per_epoch
        assert f(at - 1) == pytest.approx(0.5**passed, rel=REL), (
            f"just before milestone {milestone}"
        )
        assert f(at) == pytest.approx(0.5 ** (passed + 1), rel=REL), f"at milestone {milestone}"


@pytest.mark.parametrize(
    ("warmup_epochs", "steps_per_epoch"), [(1, 4), (2, 3), (0.5, 6), (1.5, 4), (0.25, 8)]
)
@pytest.mark.parametrize("kind", ["step", "cosine", "constant"])
def test_warmup_starts_at_the_start_factor_and_ends_at_one(kind, warmup_epochs, steps_per_epoch):
    """Warm-up is linear from start_factor at step 0 and reaches 1 exactly at its last step."""
    cfg = SchedConfig(
        kind=kind, warmup_epochs=warmup_epochs, warmup_start_factor=0.2, milestones=[3], min_lr=0.0
    )

    def f(step: int) -> float:
        return lr_factor(step, cfg=cfg, base_lr=0.1, epochs=4, steps_per_epoch=steps_per_epoch)

    end = round(warmup_epochs * steps_per_epoch)  # every case here ends on a whole step
    assert f(0) == pytest.approx(0.2, rel=REL)
    assert f(end) == pytest.approx(1.0, rel=REL)
    for step in range(1, end):
        assert f(step) == pytest.approx(0.2 + 0.8 * step / end, rel=REL), step
    # The rise is linear: equal increments, no jump into or out of the warm-up.
    increments = [f(k + 1) - f(k) for k in range(end)]
    assert increments == pytest.approx([0.8 / end] * end, rel=1e-9)
    if kind == "constant" or (kind == "step" and end + 1 < 3 * steps_per_epoch):
        assert f(end + 1) == pytest.approx(1.0, rel=REL)  # flat after the warm-up


def test_fractional_warmup_ending_between_steps():
    """warmup_epochs = 0.3 of a 5-step epoch: steps 0 and 1 warm up (to 1.5 steps), 2 is plain."""
    cfg = SchedConfig(kind="constant", warmup_epochs=0.3, warmup_start_factor=0.1)
    actual = factors(cfg, epochs=1, steps_per_epoch=5)
    assert actual == pytest.approx([0.1, 0.1 + 0.9 / 1.5, 1.0, 1.0, 1.0, 1.0], rel=REL)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 0.5, 2.5])
@pytest.mark.parametrize("min_lr", [0.0, 0.001])
def test_cosine_midpoint_and_end(min_lr, warmup_epochs):
    """Halfway through the cosine part the factor is halfway to the floor; the run ends on it."""
    base_lr, epochs, steps_per_epoch = 0.1, 6, 4
    cfg = SchedConfig(kind="cosine", min_lr=min_lr, warmup_epochs=warmup_epochs)

    def f(step: int) -> float:
        return lr_factor(
            step, cfg=cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch
        )

    floor = min_lr / base_lr
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    midpoint = (warmup_steps + total_steps) // 2  # an integer step in every case here
    assert (warmup_steps + total_steps) % 2 == 0
    assert f(warmup_steps) == pytest.approx(1.0, rel=REL)  # the cosine starts at the top
    assert f(midpoint) == pytest.approx((1.0 + floor) / 2.0, rel=REL)
    # The step before the end is still above the floor by the last cosine increment.
    last = 1.0 + math.cos(math.pi * (total_steps - 1 - warmup_steps) / (total_steps - warmup_steps))
    assert f(total_steps - 1) == pytest.approx(floor + (1.0 - floor) * last / 2.0, rel=REL)
    assert f(total_steps - 1) > floor
    # After the last optimizer step of the last epoch the learning rate is exactly min_lr ...
    assert f(total_steps) == pytest.approx(floor, rel=REL, abs=ABS)
    assert base_lr * f(total_steps) == pytest.approx(min_lr, rel=REL, abs=ABS)
    # ... and stays there if training runs on (it must not climb the cosine back up).
    for step in range(total_steps, total_steps + 2 * steps_per_epoch + 1):
        assert f(step) == pytest.approx(floor, rel=REL, abs=ABS), step
    # Monotone: never rises after the warm-up.
    values = [f(k) for k in range(warmup_steps, total_steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_constant_schedule_is_one_throughout():
    cfg = SchedConfig(kind="constant", milestones=[1, 2], gamma=0.1, min_lr=0.05)
    assert factors(cfg, epochs=3, steps_per_epoch=4, extra=5) == [1.0] * 18


def _driven_lrs(cfg: SchedConfig, *, base_lr: float, epochs: int, steps_per_epoch: int, steps):
    """The lr each optimizer step uses when a built scheduler is stepped after every update."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9)
    scheduler = build_scheduler(
        optimizer, cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])  # after the last step
    return lrs, optimizer, scheduler


@pytest.mark.parametrize(("kind", "keys", "epochs", "steps_per_epoch"), CASES, ids=CASE_IDS)
def test_scheduler_drives_the_optimizer_lr_step_by_step(kind, keys, epochs, steps_per_epoch):
    base_lr = 0.4
    if "min_lr" in keys:
        keys = {**keys, "min_lr": 4 * keys["min_lr"]}  # the same floor relative to this base_lr
    cfg = SchedConfig(kind=kind, **keys)
    total = epochs * steps_per_epoch
    lrs, optimizer, _ = _driven_lrs(
        cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch, steps=total + 3
    )
    expected = [
        base_lr * value
        for value in expected_curve(
            cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, base_lr=base_lr, extra=3
        )
    ]
    assert lrs == pytest.approx(expected, rel=REL, abs=ABS)
    if kind == "cosine":
        assert lrs[total] == pytest.approx(cfg.min_lr, rel=REL, abs=ABS)
    # Every parameter group follows the schedule, not just the first.
    assert all(g["lr"] == optimizer.param_groups[0]["lr"] for g in optimizer.param_groups)


def test_scheduler_state_round_trip_continues_the_curve():
    """A scheduler rebuilt and loaded from a state dict mid-run continues where it stopped."""
    cfg = SchedConfig(kind="cosine", min_lr=0.004, warmup_epochs=1)
    base_lr, epochs, steps_per_epoch, stop = 0.4, 4, 5, 7
    straight, _, _ = _driven_lrs(
        cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch, steps=20
    )
    _, optimizer, scheduler = _driven_lrs(
        cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch, steps=stop
    )
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()

    model = nn.Linear(3, 2)
    fresh = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9)
    resumed = build_scheduler(
        fresh, cfg, base_lr=base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    fresh.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_scheduler)
    lrs = []
    for _ in range(20 - stop):
        lrs.append(fresh.param_groups[0]["lr"])
        fresh.step()
        resumed.step()
    lrs.append(fresh.param_groups[0]["lr"])
    assert lrs == pytest.approx(straight[stop:], rel=REL, abs=ABS)
