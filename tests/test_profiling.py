"""fastkd.profiling.StepProfiler: which steps are recorded, what is written, early ends, bad args."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.profiling import StepProfiler, top_ops

CPU = torch.device("cpu")


def step_fn():
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    return lambda: layer(x).sum().backward()


def test_records_exactly_the_window_and_reports_when_done(tmp_path):
    """skip=3, steps=4: steps 4..7 are recorded; step() is True once, right after step 7."""
    run = step_fn()
    profiler = StepProfiler(tmp_path, skip=3, steps=4, device=CPU, rank=2)
    done_at = []
    for i in range(1, 11):
        run()
        if profiler.step():
            done_at.append(i)
    assert done_at == [7] and not profiler.active
    ops = json.loads((tmp_path / "ops_rank2.json").read_text())
    assert ops["steps"] == 4 and ops["sorted_by"] == "self_cpu_time_total"
    addmm = next(op for op in ops["ops"] if op["name"] == "aten::addmm")
    assert addmm["calls"] == 4  # one forward matmul per recorded step, no more
    assert (tmp_path / "trace_rank2.json").is_file() and (tmp_path / "ops_rank2.txt").is_file()
    assert profiler.result["steps"] == 4 and len(profiler.result["top_ops"]) <= 10


def test_loop_ending_inside_the_window_writes_what_was_recorded(tmp_path):
    run = step_fn()
    profiler = StepProfiler(tmp_path, skip=2, steps=5, device=CPU, rank=0)
    for _ in range(4):  # steps 3 and 4 recorded
        run()
        assert not profiler.step()
    profiler.close()
    assert json.loads((tmp_path / "ops_rank0.json").read_text())["steps"] == 2


def test_loop_ending_before_the_window_writes_nothing(tmp_path):
    run = step_fn()
    profiler = StepProfiler(tmp_path / "p", skip=5, steps=2, device=CPU, rank=0)
    for _ in range(3):
        run()
        profiler.step()
    profiler.close()
    profiler.close()  # idempotent
    assert not (tmp_path / "p").exists() and profiler.result is None


@pytest.mark.parametrize(("skip", "steps"), [(0, 1), (1, 0)])
def test_bad_window_is_refused(tmp_path, skip, steps):
    with pytest.raises(ValueError, match="must be >= 1"):
        StepProfiler(tmp_path, skip=skip, steps=steps, device=CPU, rank=0)


def test_top_ops_device_columns_and_shares():
    """The GPU form of the table (device-time keys) also works on a CPU-only profile."""
    run = step_fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    on_cpu = top_ops(prof, device=False, steps=1, limit=5)
    assert len(on_cpu) == 5 and sum(op["share"] for op in on_cpu) <= 1.0 + 1e-9
    times = [op["self_cpu_us"] for op in on_cpu]
    assert times == sorted(times, reverse=True)
    on_device = top_ops(prof, device=True, steps=1, limit=5)
    assert all({"self_device_us", "device_total_us"} <= op.keys() for op in on_device)
    assert not any(op["name"].startswith("ProfilerStep") for op in on_cpu + on_device)
