"""WSLD's diagnostics (``fastkd.diagnostics``) against a direct computation, through the fused op
and the reference alike, and summed by the meter per log interval, per epoch and across a resume.

The direct computation is the paper's definitions in float64 on the batch itself: CE_s and CE_t
from log-softmax, ``w = 1 - exp(-CE_s / CE_t)``, a regularization sample where CE_s < CE_t, the
teacher's top-1 by argmax, quantiles by sorting.
"""

from __future__ import annotations

import pytest
import torch

from fastkd import diagnostics
from fastkd import meter as meter_module
from fastkd.config import LossConfig
from fastkd.distributed import DistInfo
from fastkd.engine import build_objective
from fastkd.logging import MetricsWriter, read_metrics
from fastkd.losses import WSLDRows, ops, wsld_ce_terms
from fastkd.meter import TrainMeter

CPU = torch.device("cpu")
IMPLS = [
    "reference",
    pytest.param(
        "fused",
        marks=pytest.mark.skipif(ops.extension is None, reason="fastkd._C is not built"),
    ),
]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
SUMMARY_KEYS = {
    "teacher_train_top1",
    "w_mean",
    "w_p10",
    "w_p50",
    "w_p90",
    "reg_frac",
    "w_reg",
    "w_rest",
}


def make_batch(rows: int, classes: int, seed: int, device: str = "cpu"):
    """Logits where the teacher is right on most rows and the student on about half: a mix of
    regularization samples and others, and of teacher hits and misses."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=g)
    index = torch.arange(rows)
    teacher = torch.randn(rows, classes, generator=g) * 2
    teacher[index, labels] += 3.0
    student = torch.randn(rows, classes, generator=g) * 2
    student[index, labels] += 2.0
    return student.to(device), teacher.to(device), labels.to(device)


def direct(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
    """(w, CE_s, CE_t, teacher hit) per row, in float64 from the definitions."""
    index = labels.long().unsqueeze(1)
    ce_s = -torch.log_softmax(student.double(), 1).gather(1, index).squeeze(1)
    ce_t = -torch.log_softmax(teacher.double(), 1).gather(1, index).squeeze(1)
    w = 1.0 - torch.exp(-ce_s / (ce_t + 1e-7))
    return w, ce_s, ce_t, teacher.double().argmax(1) == labels


def assert_quantile(got: float, values: torch.Tensor, q: float) -> None:
    """``got`` is within a histogram bin (0.01) of a sample ``q`` quantile of ``values``: between
    the 'lower' and 'higher' order statistics, widened by one bin."""
    qs = torch.tensor(q, dtype=torch.float64)
    low = float(torch.quantile(values, qs, interpolation="lower"))
    high = float(torch.quantile(values, qs, interpolation="higher"))
    assert low - 1.0 / diagnostics.BINS <= got <= high + 1.0 / diagnostics.BINS, (q, got, low, high)


def assert_matches_direct(summary: dict[str, float], student, teacher, labels) -> None:
    w, ce_s, ce_t, hits = direct(student, teacher, labels)
    # The fixed batches keep every row away from CE_s == CE_t, where float32 may round either way.
    assert float((ce_s / ce_t - 1).abs().min()) > 1e-5
    reg = ce_s < ce_t
    assert 0 < int(reg.sum()) < len(reg) and 0 < int(hits.sum()) < len(hits)  # both kinds occur
    assert summary.keys() == SUMMARY_KEYS
    assert summary["reg_frac"] == float(reg.double().mean())
    assert summary["teacher_train_top1"] == float(hits.double().mean())
    assert summary["w_mean"] == pytest.approx(float(w.mean()), rel=1e-5)
    assert summary["w_reg"] == pytest.approx(float(w[reg].mean()), rel=1e-5)
    assert summary["w_rest"] == pytest.approx(float(w[~reg].mean()), rel=1e-5)
    for q in (0.1, 0.5, 0.9):
        assert_quantile(summary[f"w_p{round(q * 100)}"], w, q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_batch_matches_the_direct_computation(impl, dtype, device):
    student, teacher, labels = make_batch(512, 50, seed=0, device=device)
    student, teacher = student.to(dtype), teacher.to(dtype)  # the direct side sees the same values
    _, rows = wsld_ce_terms(
        student, teacher, labels, tau=4.0, loss_weight=2.5, ce_weight=1.0, impl=impl
    )
    counts = diagnostics.step_counts(teacher, labels, rows)
    assert counts.device == student.device and counts.dtype == torch.float32
    assert_matches_direct(diagnostics.summarize(counts.tolist()), student, teacher, labels)


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_op_and_the_reference_give_the_same_rows(device):
    if ops.extension is None:
        pytest.skip("fastkd._C is not built")
    student, teacher, labels = make_batch(300, 1000, seed=1, device=device)
    kwargs = dict(tau=2.0, loss_weight=1.0, ce_weight=0.0)
    _, fused = wsld_ce_terms(student, teacher, labels, impl="fused", **kwargs)
    _, reference = wsld_ce_terms(student, teacher, labels, impl="reference", **kwargs)
    w, ce_s, _, _ = direct(student, teacher, labels)
    for name in fused._fields:
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), msg=name)
    torch.testing.assert_close(fused.weight.double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.student_ce.double(), ce_s, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.teacher_max, teacher.amax(1))  # exact: the max of the same values


def test_steps_sum_to_the_diagnostics_of_their_rows_taken_together():
    """An interval's quantiles are the quantiles of all its rows (not a mean of per-step ones),
    and its ratios are ratios of sums over unequal batches."""
    batches = [make_batch(rows, 20, seed=10 + rows) for rows in (64, 200, 7, 129)]
    total = sum(
        diagnostics.step_counts(t, y, wsld_ce_terms(s, t, y, tau=1.0, loss_weight=1.0,
                                                    ce_weight=1.0)[1])
        for s, t, y in batches
    )  # fmt: skip
    student, teacher, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert_matches_direct(diagnostics.summarize(total.tolist()), student, teacher, labels)


def test_histogram_quantiles_edges_and_empty_sets():
    w = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.999, 1.0, 1.0, 1.0])  # 1.0 is w of CE_s >> CE_t
    rows = torch.zeros(len(w))
    stats = WSLDRows(w, rows, rows, rows)
    teacher = torch.zeros(len(w), 3)
    counts = diagnostics.step_counts(teacher, torch.zeros(len(w), dtype=torch.long), stats)
    below = counts[5:].tolist()
    assert below[-1] == len(w)  # every row, w = 1 included
    assert below[0] == 2  # w < 0.01
    assert diagnostics.histogram_quantile(below, 0.0) == 0.0
    assert 0.5 <= diagnostics.histogram_quantile(below, 0.5) <= 0.51  # the 4th of 8 is 0.5
    assert diagnostics.histogram_quantile(below, 1.0) == pytest.approx(1.0, abs=0.01)
    assert diagnostics.histogram_quantile([0.0] * 100, 0.5) is None
    summary = diagnostics.summarize(counts.tolist())
    assert summary["reg_frac"] == 4 / 8  # 0, 0, 0.25 and 0.5 are below 1 - 1/e = 0.632
    assert summary["reg_frac"] == float((w < diagnostics.REG_THRESHOLD).double().mean())
    assert summary["teacher_train_top1"] == 1.0  # ties with the max count as hits
    assert diagnostics.summarize([0.0] * len(counts)) == {}  # no rows: nothing to say
    assert diagnostics.summarize([]) == {}

    # No regularization sample: their mean w is None (JSON null), shown as "-".
    high = torch.tensor([0.7, 0.9])
    counts = diagnostics.step_counts(teacher[:2], torch.zeros(2, dtype=torch.long),
                                     WSLDRows(high, rows[:2], rows[:2], rows[:2]))  # fmt: skip
    summary = diagnostics.summarize(counts.tolist())
    assert summary["reg_frac"] == 0.0 and summary["w_reg"] is None
    assert summary["w_rest"] == pytest.approx(0.8)
    line = diagnostics.describe(summary)
    assert "reg 0% (w - vs 0.80)" in line and "None" not in line and "nan" not in line


def test_hinton_kd_counts_only_the_teacher_and_ce_has_no_diagnostics():
    student, teacher, labels = make_batch(64, 10, seed=3)
    teacher[0], labels[0] = (
        0.0,
        3,
    )  # all ten tie: argmax says class 0, yet a tie at the max is a hit
    hits = direct(student, teacher, labels)[3]
    assert not hits[0]
    expected = (1 + float(hits[1:].sum())) / 64  # the same rule for KD as for WSLD
    for kind, keys in (("kd", {"teacher_train_top1"}), ("ce", set()), ("wsld", SUMMARY_KEYS)):
        objective = build_objective(LossConfig(kind=kind), diagnostics_on=True)
        _, terms = objective(student, teacher, labels)
        counts = terms.get(diagnostics.COUNTS)
        summary = diagnostics.summarize(counts.tolist()) if counts is not None else {}
        assert summary.keys() == keys, kind
        if keys:
            assert summary["teacher_train_top1"] == expected, kind
        off = build_objective(LossConfig(kind=kind), diagnostics_on=False)
        assert diagnostics.COUNTS not in off(student, teacher, labels)[1]


# ---------------------------------------------------------------------------------------------
# Through the meter: step records per interval, epoch records per epoch, exact across a resume
# ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_meter(run_dir, world_size: int = 1, diagnostics: bool = True) -> TrainMeter:
    parameter = torch.nn.Parameter(torch.zeros(1))
    meter = TrainMeter(
        MetricsWriter(run_dir),
        optimizer=torch.optim.SGD([parameter], lr=0.1),
        dist=DistInfo(rank=0, world_size=world_size, local_rank=0, device=CPU),
        log_every=2,
        compiled=False,
        diagnostics=diagnostics,
    )
    meter.compile_time_s = 0.0  # no warm-up step to report
    return meter


def feed(meter: TrainMeter, clock: Clock, batch, step: int) -> None:
    objective = build_objective(LossConfig(kind="wsld", tau=2.0), diagnostics_on=True)
    student, teacher, labels = batch
    _, terms = objective(student, teacher, labels)
    clock.now += 1.0
    meter.update(terms, student, labels, global_step=step)


def test_step_records_cover_their_interval_and_the_epoch_record_the_epoch(
    tmp_path, monkeypatch, caplog
):
    clock = Clock()
    monkeypatch.setattr(meter_module.time, "perf_counter", clock)
    batches = [make_batch(96, 12, seed=20 + i) for i in range(5)]
    meter = make_meter(tmp_path / "whole")
    meter.start_epoch(1, 1, 5)
    with caplog.at_level("INFO", logger="fastkd"):
        for i, batch in enumerate(batches):
            feed(meter, clock, batch, i + 1)
            if i == 2:
                saved = meter.state_dict()
        epoch = meter.end_epoch()
    steps = [r for r in read_metrics(tmp_path / "whole") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 5]
    for record, (start, end) in zip(steps, [(0, 2), (2, 4), (4, 5)], strict=True):
        together = (torch.cat(parts) for parts in zip(*batches[start:end], strict=True))
        assert_matches_direct({k: record[k] for k in SUMMARY_KEYS}, *together)
    everything = [torch.cat(parts) for parts in zip(*batches, strict=True)]
    assert_matches_direct({k: epoch[k] for k in SUMMARY_KEYS}, *everything)
    line = [m for m in caplog.messages if "step 4/5" in m][0]
    assert " reg " in line and "teacher top-1" in line and "p10/50/90" in line
    assert "wsld_weight" not in line  # w's mean is shown once

    # Resumed after step 3: the epoch record is the uninterrupted one, bit for bit, and so is
    # the next step record (its interval began at the step-2 record, before the checkpoint).
    resumed = make_meter(tmp_path / "resumed")
    resumed.start_epoch(1, 1, 5, start=3, resume=saved)
    for i in (3, 4):
        feed(resumed, clock, batches[i], i + 1)
    again = resumed.end_epoch()
    assert {k: again[k] for k in SUMMARY_KEYS} == {k: epoch[k] for k in SUMMARY_KEYS}
    (first,) = [r for r in read_metrics(tmp_path / "resumed") if r["step"] == 4]
    assert {k: first[k] for k in SUMMARY_KEYS} == {k: steps[1][k] for k in SUMMARY_KEYS}

    # Resumed with train.diagnostics=false: the saved counts are dropped, no record has any.
    off = make_meter(tmp_path / "off", diagnostics=False)
    off.start_epoch(1, 1, 5, start=3, resume=saved)
    for i in (3, 4):
        _, terms = build_objective(LossConfig(kind="wsld"))(*batches[i])
        off.update(terms, batches[i][0], batches[i][2], global_step=i + 1)
    assert not SUMMARY_KEYS & off.end_epoch().keys()
    assert all(not SUMMARY_KEYS & r.keys() for r in read_metrics(tmp_path / "off"))


def test_the_epoch_record_sums_every_ranks_rows(tmp_path, monkeypatch):
    """Under torchrun the epoch's counts join the meter's one all-reduce: with a second rank's
    sums added there, the epoch record covers both ranks' rows."""
    mine, theirs = make_batch(80, 12, seed=50), make_batch(48, 12, seed=51)
    other = make_meter(tmp_path / "rank1", world_size=2)
    other.start_epoch(1, 1, 1)
    feed(other, Clock(), theirs, 1)
    sent = []
    monkeypatch.setattr(meter_module, "all_reduce_sum", lambda t: sent.append(t.clone()) or t)
    other.end_epoch()
    monkeypatch.setattr(meter_module, "all_reduce_sum", lambda t: t.add_(sent[0]))
    meter = make_meter(tmp_path / "rank0", world_size=2)
    meter.start_epoch(1, 1, 1)
    feed(meter, Clock(), mine, 1)
    epoch = meter.end_epoch()
    both = [torch.cat(parts) for parts in zip(mine, theirs, strict=True)]
    assert_matches_direct({k: epoch[k] for k in SUMMARY_KEYS}, *both)


def test_a_checkpoint_from_before_diagnostics_resumes_with_them_from_the_resume(tmp_path):
    """Meter states saved before diagnostics existed have no counts: the epoch's diagnostics
    then cover the steps run since the resume."""
    batches = [make_batch(32, 8, seed=40 + i) for i in range(2)]
    meter = make_meter(tmp_path)
    meter.start_epoch(1, 1, 4)
    feed(meter, Clock(), batches[0], 1)
    old = meter.state_dict()
    del old["counts"]
    resumed = make_meter(tmp_path / "resumed")
    resumed.start_epoch(1, 1, 4, start=1, resume=old)
    feed(resumed, Clock(), batches[1], 2)
    got = resumed.end_epoch()
    assert_matches_direct({k: got[k] for k in SUMMARY_KEYS}, *batches[1])
