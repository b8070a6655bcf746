"""The trainer's objective (``engine.build_objective``) honours every ``loss.*`` weight, per kind.

Each objective's total, logged terms and gradient are compared with a direct float64 computation
from the formulas (DESIGN.md for WSLD; Hinton's KD; plain cross-entropy with label smoothing),
and each weight is also scaled on its own to check that the total moves exactly as the formula
says: a weight that is read but not applied (or applied in only one WSLD implementation) fails.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.config import LossConfig
from fastkd.engine import build_objective
from fastkd.losses import fused_available, ops

HAVE_FUSED = fused_available("cpu")
needs_fused = pytest.mark.skipif(
    not HAVE_FUSED, reason=f"fastkd._C is not built (run `{ops.BUILD_COMMAND}`)"
)
CAPABILITIES = (
    ops.extension.cpu_capabilities.split(",") if ops.extension is not None else ["default"]
)
# The fused op once per CPU kernel build (FASTKD_CPU_CAPABILITY pins it; read per call).
WSLD_IMPLS = [
    pytest.param("reference", None, id="reference"),
    *(
        pytest.param(
            "fused",
            capability,
            id=f"fused-{capability}",
            marks=[
                needs_fused,
                pytest.mark.skipif(
                    capability not in CAPABILITIES, reason=f"no {capability} CPU kernel here"
                ),
            ],
        )
        for capability in ("default", "avx2")
    ),
]
# The objectives compute in float32 whatever the logits (the CE term via .float(), the WSLD op
# at float32 for float32 logits): float32 rounding over 6 x 7 logits stays well below 1e-5
# relative, while a dropped or doubled weight changes a term by tens of percent.
RTOL = 2e-5
ATOL = 1e-6
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


@pytest.fixture
def pin_capability(monkeypatch):
    def pin(capability: str | None) -> None:
        if capability is not None:
            monkeypatch.setenv("FASTKD_CPU_CAPABILITY", capability)

    return pin


def make_logits(dtype: torch.dtype = torch.float32, rows: int = 6, classes: int = 7, seed: int = 0):
    """Fixed random student/teacher logits and labels; some rows have the student more confident
    on the true class than the teacher (WSLD weights below 1 - 1/e) and some less."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2.0).to(dtype)
    teacher = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 2.0).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    return student, teacher, labels


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def direct(kind: str, cfg: LossConfig, student, teacher, labels) -> dict[str, torch.Tensor]:
    """The objective straight from its formula in float64; ``total`` has the gradient.

    ce:   CE_ls = mean_i[(1 - ls) * CE_i + ls * mean_c(-log softmax(s)_ic)]
    kd:   ce_weight * CE_ls + loss_weight * tau^2 * mean_i KL(softmax(t/tau) || softmax(s/tau))
    wsld: ce_weight * CE_ls + loss_weight * tau^2 * mean_i(w_i * soft_ce_i), where w_i comes
          from the unsmoothed hard-label CEs of student and teacher (DESIGN.md).
    """
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double()
    rows = torch.arange(s.shape[0])
    log_softmax_s = _log_softmax(s)
    ce_rows = -log_softmax_s[rows, labels]
    ls = cfg.label_smoothing
    smoothed_rows = (1.0 - ls) * ce_rows + ls * (-log_softmax_s.mean(dim=1))
    out: dict[str, torch.Tensor] = {"student": s, "ce": ce_rows.mean().detach()}
    if kind == "ce":
        out["total"] = smoothed_rows.mean()
        return out
    tau = cfg.tau
    log_q = _log_softmax(s / tau)
    log_p = _log_softmax(t / tau)
    p = log_p.exp()
    if kind == "kd":
        distill = cfg.loss_weight * tau**2 * (p * (log_p - log_q)).sum(dim=1).mean()
        out["kd"] = distill.detach()
    else:
        soft_ce = -(p * log_q).sum(dim=1)
        ce_teacher_rows = -_log_softmax(t)[rows, labels]
        ratio = ce_rows.detach() / (ce_teacher_rows + 1e-7)
        weight = 1.0 - torch.exp(-ratio.clamp_min(0.0))
        distill = cfg.loss_weight * tau**2 * (weight * soft_ce).mean()
        out["wsld"] = distill.detach()
        out["wsld_weight"] = weight.mean().detach()
    out["total"] = cfg.ce_weight * smoothed_rows.mean() + distill
    return out


def run_objective(cfg: LossConfig, student, teacher, labels):
    """(total, logged terms, d total / d student) of ``build_objective(cfg)``."""
    student = student.detach().clone().requires_grad_(True)
    total, terms = build_objective(cfg)(
        student, None if cfg.kind == "ce" else teacher.detach().clone(), labels
    )
    total.backward()
    return total.detach(), terms, student.grad


def assert_matches_direct(cfg: LossConfig, student, teacher, labels, *, terms_too=True):
    total, terms, grad = run_objective(cfg, student, teacher, labels)
    want = direct(cfg.kind, cfg, student, teacher, labels)
    want["total"].backward()
    close = dict(rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(total.double(), want["total"].detach(), **close)
    torch.testing.assert_close(terms["loss"].double(), want["total"].detach(), **close)
    torch.testing.assert_close(grad.double(), want["student"].grad, **close)
    if terms_too:
        for name in {"ce", "kd", "wsld", "wsld_weight"} & want.keys():
            torch.testing.assert_close(
                terms[name].double(), want[name], **close, msg=lambda m, n=name: f"{n}: {m}"
            )
    return total


def _total(cfg: LossConfig, student, teacher, labels) -> float:
    return float(run_objective(cfg, student, teacher, labels)[0])


# ---------------------------------------------------------------------------------------------
# loss.kind=ce
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
def test_ce_objective_matches_the_formula(label_smoothing, dtype):
    student, teacher, labels = make_logits(dtype)
    cfg = LossConfig(kind="ce", label_smoothing=label_smoothing)
    total, terms, _ = run_objective(cfg, student, teacher, labels)
    assert set(terms) == {"loss", "ce"}
    assert_matches_direct(cfg, student, teacher, labels, terms_too=False)
    # The logged ce is the objective (label-smoothed when asked), so it equals the loss.
    torch.testing.assert_close(terms["ce"], total)


def test_ce_label_smoothing_changes_the_total_as_the_formula_says():
    """CE_ls is linear in ls: CE_ls = CE_0 + ls * (uniform CE - CE_0)."""
    student, teacher, labels = make_logits()
    plain = _total(LossConfig(kind="ce"), student, teacher, labels)
    uniform = float(-_log_softmax(student.double()).mean())
    for ls in (0.1, 0.5):
        smoothed = _total(LossConfig(kind="ce", label_smoothing=ls), student, teacher, labels)
        assert smoothed == pytest.approx(plain + ls * (uniform - plain), rel=RTOL)
        assert smoothed != pytest.approx(plain, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# loss.kind=kd
# ---------------------------------------------------------------------------------------------

KD_WEIGHTS = [
    dict(tau=1.0, loss_weight=1.0, ce_weight=1.0),
    dict(tau=2.0, loss_weight=2.5, ce_weight=1.0),
    dict(tau=4.0, loss_weight=0.7, ce_weight=0.0),
    dict(tau=0.5, loss_weight=0.0, ce_weight=2.0),
    dict(tau=3.0, loss_weight=1.3, ce_weight=0.4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "weights", KD_WEIGHTS, ids=lambda w: "-".join(f"{k}={v}" for k, v in w.items())
)
def test_kd_objective_matches_the_formula(weights, dtype):
    student, teacher, labels = make_logits(dtype)
    cfg = LossConfig(kind="kd", **weights)
    _, terms, _ = run_objective(cfg, student, teacher, labels)
    assert set(terms) == {"loss", "ce", "kd"}
    assert_matches_direct(cfg, student, teacher, labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_label_smoothing_applies_to_the_hard_label_term(dtype):
    """total = ce_weight * CE_ls + loss_weight * tau^2 * KL (the KL term unchanged)."""
    student, teacher, labels = make_logits(dtype)
    cfg = LossConfig(kind="kd", tau=2.0, loss_weight=1.5, ce_weight=0.8, label_smoothing=0.2)
    _, terms, _ = run_objective(cfg, student, teacher, labels)
    assert_matches_direct(cfg, student, teacher, labels, terms_too=False)
    want = direct("kd", cfg, student, teacher, labels)
    torch.testing.assert_close(terms["kd"].double(), want["kd"], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# loss.kind=wsld
# ---------------------------------------------------------------------------------------------

WSLD_WEIGHTS = [
    dict(tau=1.0, loss_weight=1.0, ce_weight=1.0),
    dict(tau=2.0, loss_weight=2.5, ce_weight=1.0),  # the ImageNet recipe
    dict(tau=4.0, loss_weight=2.25, ce_weight=0.0),  # the CIFAR-100 recipe, WSLD alone
    dict(tau=0.5, loss_weight=0.0, ce_weight=2.0),
    dict(tau=3.0, loss_weight=1.3, ce_weight=0.4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "weights", WSLD_WEIGHTS, ids=lambda w: "-".join(f"{k}={v}" for k, v in w.items())
)
@pytest.mark.parametrize(("impl", "capability"), WSLD_IMPLS)
def test_wsld_objective_matches_the_formula(impl, capability, weights, dtype, pin_capability):
    pin_capability(capability)
    student, teacher, labels = make_logits(dtype)
    cfg = LossConfig(kind="wsld", impl=impl, **weights)
    _, terms, _ = run_objective(cfg, student, teacher, labels)
    assert set(terms) == {"loss", "ce", "wsld", "wsld_weight"}
    assert_matches_direct(cfg, student, teacher, labels)


@pytest.mark.parametrize(
    ("kind", "impl", "capability"),
    [pytest.param("kd", "auto", None, id="kd")]
    + [pytest.param("wsld", *p.values, id=f"wsld-{p.id}", marks=p.marks) for p in WSLD_IMPLS],
)
def test_each_weight_scales_its_own_term(kind, impl, capability, pin_capability):
    """ce_weight scales the hard-label CE, loss_weight the distillation term, tau changes it to
    tau^2 times the term at that temperature; each alone, for kd and every wsld implementation."""
    pin_capability(capability)
    student, teacher, labels = make_logits()
    base = LossConfig(kind=kind, tau=2.0, loss_weight=1.0, ce_weight=1.0, impl=impl)
    want = direct(kind, base, student, teacher, labels)
    ce, distill = float(want["ce"]), float(want[kind])  # the term at tau 2, loss_weight 1
    if kind == "wsld":
        assert 0.05 < float(want["wsld_weight"]) < 0.95  # neither weight extreme hides a factor

    def total(**weights) -> float:
        return _total(LossConfig(kind=kind, impl=impl, **weights), student, teacher, labels)

    # ce_weight: 0, 1, 2 add 0, 1, 2 hard-label CEs to the same distillation term.
    by_ce_weight = [total(tau=2.0, loss_weight=1.0, ce_weight=w) for w in (0.0, 1.0, 2.0)]
    assert by_ce_weight == pytest.approx([distill, ce + distill, 2 * ce + distill], rel=RTOL)
    # loss_weight: 0 leaves the CE alone; 2.5 scales the distillation term by 2.5.
    by_loss_weight = [total(tau=2.0, loss_weight=w, ce_weight=1.0) for w in (0.0, 1.0, 2.5)]
    assert by_loss_weight == pytest.approx([ce, ce + distill, ce + 2.5 * distill], rel=RTOL)
    # tau: the distillation term at that temperature (tau^2-scaled), not the tau = 2 one.
    for tau in (1.0, 4.0):
        at_tau = direct(
            kind, LossConfig(kind=kind, tau=tau, loss_weight=1.0), student, teacher, labels
        )
        assert total(tau=tau, loss_weight=1.0, ce_weight=0.0) == pytest.approx(
            float(at_tau[kind]), rel=RTOL
        )
    assert total(tau=4.0, loss_weight=1.0, ce_weight=0.0) != pytest.approx(distill, rel=1e-2)


@needs_fused
@pytest.mark.parametrize("dtype", DTYPES)
def test_wsld_impls_agree(dtype):
    """The fused op and the reference give one objective (any CPU kernel the op picks)."""
    student, teacher, labels = make_logits(dtype, rows=9, classes=11, seed=3)
    results = [
        run_objective(
            LossConfig(kind="wsld", tau=3.0, loss_weight=1.7, ce_weight=0.6, impl=impl),
            student,
            teacher,
            labels,
        )
        for impl in ("reference", "fused")
    ]
    (ref_total, ref_terms, ref_grad), (fused_total, fused_terms, fused_grad) = results
    torch.testing.assert_close(fused_total, ref_total, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=RTOL, atol=ATOL)
    for name in ref_terms:
        torch.testing.assert_close(fused_terms[name], ref_terms[name], rtol=RTOL, atol=ATOL)


@needs_fused
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_wsld_impl_selects_the_implementation(impl):
    """loss.impl reaches the loss: the fused op runs for "fused" and only then (the two agree,
    so values alone cannot tell whether the setting was passed on)."""
    student, teacher, labels = make_logits()
    cfg = LossConfig(kind="wsld", impl=impl)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run_objective(cfg, student, teacher, labels)
    names = {event.name for event in profiler.events()}
    assert ("fastkd::wsld_ce" in names) == (impl == "fused"), sorted(n for n in names if "::" in n)


@pytest.mark.parametrize(("impl", "capability"), WSLD_IMPLS)
def test_wsld_label_smoothing_applies_to_the_hard_label_term(impl, capability, pin_capability):
    """total = ce_weight * CE_ls + WSLD, with WSLD's weights w_i still computed from
    the unsmoothed hard-label CEs of student and teacher (so ``wsld`` and ``wsld_weight`` do
    not change with label smoothing)."""
    pin_capability(capability)
    student, teacher, labels = make_logits()
    cfg = LossConfig(
        kind="wsld", tau=2.0, loss_weight=2.5, ce_weight=0.8, label_smoothing=0.2, impl=impl
    )
    _, terms, _ = run_objective(cfg, student, teacher, labels)
    assert_matches_direct(cfg, student, teacher, labels, terms_too=False)
    want = direct("wsld", cfg, student, teacher, labels)
    for name in ("wsld", "wsld_weight"):
        torch.testing.assert_close(terms[name].double(), want[name], rtol=RTOL, atol=ATOL)
