"""The public loss API (fastkd.losses): values, gradients, edge cases, errors, compile, autocast.

Every implementation is checked against ``wsld_float64``, an independent re-derivation of the
math in float64 from elementary tensor ops, and against mmrazor's op sequence (``mmrazor_wsld``, re-implemented here).
The fused-op tests run once per CPU kernel build (portable and AVX2) via ``cpu_capability``;
those that hold for any device (``kernel_device``) run on CUDA as well, marked ``gpu``
(benchmarks/gpu_check.sh runs them on a GPU node), so the CPU run here exercises the same checks.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

try:  # property tests use hypothesis where installed, else a seeded random sweep (GPU machine)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

from fastkd.losses import (
    LossTerms,
    WSLDLoss,
    fused_available,
    kd_loss,
    ops,
    wsld,
    wsld_ce_loss,
    wsld_loss,
)

HAVE_FUSED = fused_available("cpu")
needs_fused = pytest.mark.skipif(
    not HAVE_FUSED, reason=f"fastkd._C is not built (run `{ops.BUILD_COMMAND}`)"
)
IMPLS = ["reference", pytest.param("fused", marks=needs_fused)]
_KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # what the CUDA kernels take
CAPABILITIES = (
    ops.extension.cpu_capabilities.split(",") if ops.extension is not None else ["default"]
)


@pytest.fixture(params=["default", "avx2"])
def cpu_capability(request, monkeypatch):
    """Runs a test with each CPU build of the kernels (FASTKD_CPU_CAPABILITY)."""
    if request.param not in CAPABILITIES:
        pytest.skip(f"no {request.param} CPU kernel on this machine/build")
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", request.param)
    return request.param


needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(params=["cpu-default", "cpu-avx2", pytest.param("cuda", marks=needs_cuda)])
def kernel_device(request, monkeypatch) -> torch.device:
    """Runs a test on each build of the fused kernels: the CPU ones, then CUDA (gpu-marked)."""
    if request.param == "cuda":
        return torch.device("cuda")
    capability = request.param.removeprefix("cpu-")
    if capability not in CAPABILITIES:
        pytest.skip(f"no {capability} CPU kernel on this machine/build")
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", capability)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def _log_softmax64(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def wsld_float64(s, t, y, *, tau, loss_weight, ce_weight=0.0) -> dict[str, torch.Tensor | float]:
    """The DESIGN.md math in float64 from elementary ops, with the closed-form gradient of total."""
    s = s.detach().double()
    t = t.detach().double()
    rows, classes = s.shape
    rows_index = torch.arange(rows)
    log_q = _log_softmax64(s / tau)
    p = _log_softmax64(t / tau).exp()
    soft_ce = -(p * log_q).sum(dim=1)
    log_softmax_s = _log_softmax64(s)
    ce_s = -log_softmax_s[rows_index, y]
    ce_t = -_log_softmax64(t)[rows_index, y]
    weight = 1.0 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0.0))
    n = max(rows, 1)
    wsld_value = loss_weight * tau**2 * float((weight * soft_ce).sum()) / n
    ce = float(ce_s.sum()) / n
    onehot = torch.zeros(rows, classes, dtype=torch.float64)
    onehot[rows_index, y] = 1.0
    grad = (loss_weight * tau / n) * weight[:, None] * (log_q.exp() - p) + (ce_weight / n) * (
        log_softmax_s.exp() - onehot
    )
    return {
        "total": ce_weight * ce + wsld_value,
        "wsld": wsld_value,
        "ce": ce,
        "weight_mean": float(weight.sum()) / n,
        "weight": weight,
        "grad": grad,
    }


def mmrazor_wsld(student, teacher, gt_labels, tau, loss_weight, num_classes):
    """mmrazor's ``WSLD.forward`` op sequence (softmax modules, one_hot, torch.max, mean)."""
    student_logits = student / tau
    teacher_logits = teacher / tau
    teacher_probs = F.softmax(teacher_logits, dim=1)
    ce_loss = -torch.sum(teacher_probs * F.log_softmax(student_logits, dim=1), 1, keepdim=True)
    log_softmax_s = F.log_softmax(student.detach(), dim=1)
    log_softmax_t = F.log_softmax(teacher.detach(), dim=1)
    one_hot_labels = F.one_hot(gt_labels, num_classes=num_classes).to(student.dtype)
    ce_loss_s = -torch.sum(one_hot_labels * log_softmax_s, 1, keepdim=True)
    ce_loss_t = -torch.sum(one_hot_labels * log_softmax_t, 1, keepdim=True)
    focal_weight = ce_loss_s / (ce_loss_t + 1e-7)
    focal_weight = torch.max(focal_weight, torch.zeros(1, dtype=student.dtype))
    focal_weight = 1 - torch.exp(-focal_weight)
    ce_loss = focal_weight * ce_loss
    return loss_weight * (tau**2) * torch.mean(ce_loss)


def make_batch(
    rows, classes, *, dtype=torch.float32, scale=3.0, seed=0, requires_grad=True, device="cpu"
):
    """Seeded logits (drawn in float64 on the CPU, so every device sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    student, teacher, labels = student.to(device), teacher.to(device), labels.to(device)
    return student.requires_grad_(requires_grad), teacher, labels


def loss_and_grad(impl, student, teacher, labels, *, tau, loss_weight, ce_weight):
    """``wsld_ce_loss`` terms and d total / d student for one implementation."""
    student = student.detach().clone().requires_grad_(True)
    terms = wsld_ce_loss(
        student, teacher, labels, tau=tau, loss_weight=loss_weight, ce_weight=ce_weight, impl=impl
    )
    terms.total.backward()
    return LossTerms(*(value.detach() for value in terms)), student.grad


def assert_grad_close(actual, expected, *, rtol, atol_fraction):
    """Elementwise closeness with an absolute slack scaled to the gradient's magnitude."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = actual.double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_fraction * scale + 1e-30)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 derivation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 0.7])
def test_matches_float64_derivation(impl, tau, cpu_capability):
    student, teacher, labels = make_batch(64, 1000, seed=1)
    terms, grad = loss_and_grad(
        impl, student, teacher, labels, tau=tau, loss_weight=2.5, ce_weight=1.0
    )
    truth = wsld_float64(student, teacher, labels, tau=tau, loss_weight=2.5, ce_weight=1.0)
    for name in ("total", "wsld", "ce", "weight_mean"):
        value = getattr(terms, name)
        assert value.dtype == torch.float32 and value.dim() == 0, name
        assert float(value) == pytest.approx(truth[name], rel=2e-6), name
    assert_grad_close(grad, truth["grad"], rtol=1e-4, atol_fraction=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_inputs_are_exact(impl, cpu_capability):
    student, teacher, labels = make_batch(16, 50, dtype=torch.float64, seed=2)
    terms, grad = loss_and_grad(
        impl, student, teacher, labels, tau=3.0, loss_weight=1.5, ce_weight=0.5
    )
    truth = wsld_float64(student, teacher, labels, tau=3.0, loss_weight=1.5, ce_weight=0.5)
    assert terms.total.dtype == torch.float64
    assert float(terms.total) == pytest.approx(truth["total"], rel=1e-12)
    assert float(terms.weight_mean) == pytest.approx(truth["weight_mean"], rel=1e-12)
    assert_grad_close(grad, truth["grad"], rtol=1e-9, atol_fraction=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_mmrazor(impl, cpu_capability):
    """The WSLD value and its student gradient equal mmrazor's op sequence (float64)."""
    student, teacher, labels = make_batch(32, 100, dtype=torch.float64, seed=3)
    for tau, loss_weight in [(2.0, 2.5), (4.0, 2.25), (1.0, 1.0)]:
        s_ref = student.detach().clone().requires_grad_(True)
        expected = mmrazor_wsld(s_ref, teacher, labels, tau, loss_weight, num_classes=100)
        expected.backward()
        s_ours = student.detach().clone().requires_grad_(True)
        ours = wsld_loss(s_ours, teacher, labels, tau=tau, loss_weight=loss_weight, impl=impl)
        ours.backward()
        assert ours.detach().item() == pytest.approx(expected.detach().item(), rel=1e-12)
        torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-9, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("classes", [1, 2, 10, 1000])
def test_uniform_logits_closed_form(impl, classes, cpu_capability):
    """Constant rows: q = p = 1/C, ce_i = CE_s = CE_t = log C, so w = 1 - exp(-logC/(logC+1e-7))."""
    rows, tau, loss_weight, ce_weight = 5, 2.0, 2.5, 1.0
    student = torch.full((rows, classes), 0.3)
    teacher = torch.full((rows, classes), -1.7)
    labels = torch.arange(rows) % classes
    terms, grad = loss_and_grad(
        impl, student, teacher, labels, tau=tau, loss_weight=loss_weight, ce_weight=ce_weight
    )
    log_c = math.log(classes)
    weight = 1 - math.exp(-(log_c / (log_c + 1e-7))) if classes > 1 else 0.0
    assert float(terms.weight_mean) == pytest.approx(weight, rel=1e-6, abs=1e-7)
    assert float(terms.wsld) == pytest.approx(loss_weight * tau**2 * weight * log_c, rel=1e-6)
    assert float(terms.ce) == pytest.approx(log_c, rel=1e-6, abs=1e-7)
    # The WSLD gradient vanishes (q = p); the CE gradient is (1/C - onehot) / N.
    expected = (torch.full((rows, classes), 1 / classes) - F.one_hot(labels, classes)) / rows
    torch.testing.assert_close(grad, expected.float() * ce_weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_confident_teacher(impl, cpu_capability):
    """A teacher certain of the label: CE_t = 0, so w = 1 (student unsure) or 0 (student sure)."""
    classes = 7
    labels = torch.tensor([3, 0])
    teacher = torch.zeros(2, classes)
    teacher[torch.arange(2), labels] = 1e4
    student = torch.tensor([[0.5, -1.0, 2.0, 1.0, 0.0, 0.3, -0.2], [1e4, 0, 0, 0, 0, 0, 0.0]])
    tau = 2.0
    terms, grad = loss_and_grad(
        impl, student, teacher, labels, tau=tau, loss_weight=1.0, ce_weight=0.0
    )
    # Row 0: w = 1, p = onehot(3), ce_0 = -log q_3 at tau. Row 1: CE_s = 0 -> ratio 0 -> w = 0.
    log_q = F.log_softmax(student[0].double() / tau, dim=0)
    expected = tau**2 * float(-log_q[3]) / 2
    assert float(terms.wsld) == pytest.approx(expected, rel=1e-6)
    assert float(terms.weight_mean) == pytest.approx(0.5, abs=1e-7)
    q0 = log_q.exp()
    expected_grad_row0 = (tau / 2) * (q0 - F.one_hot(torch.tensor(3), classes).double())
    torch.testing.assert_close(grad[0].double(), expected_grad_row0, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[1] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_classes_closed_form(impl, cpu_capability):
    """C = 2 reduces to logistic functions of the logit gaps."""
    a, b, c, d = 1.3, -0.4, 0.2, 2.1  # student [a, b], teacher [c, d], label 0
    tau, loss_weight = 3.0, 2.0
    student = torch.tensor([[a, b]])
    teacher = torch.tensor([[c, d]])
    labels = torch.tensor([0])

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    ce_s = -log_sigmoid(a - b)
    ce_t = -log_sigmoid(c - d)
    p0 = 1 / (1 + math.exp(-(c - d) / tau))
    soft = -(p0 * log_sigmoid((a - b) / tau) + (1 - p0) * log_sigmoid((b - a) / tau))
    weight = 1 - math.exp(-(ce_s / (ce_t + 1e-7)))
    value = wsld_loss(student, teacher, labels, tau=tau, loss_weight=loss_weight, impl=impl)
    assert float(value) == pytest.approx(loss_weight * tau**2 * weight * soft, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
def test_single_class_is_zero(impl, dtype, kernel_device):
    student, teacher, labels = make_batch(4, 1, dtype=dtype, seed=4, device=kernel_device)
    terms, grad = loss_and_grad(impl, student, teacher, labels, tau=2.0, loss_weight=1, ce_weight=1)
    assert float(terms.total) == 0.0 and float(terms.weight_mean) == 0.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
def test_empty_batch_is_zero(impl, dtype, kernel_device):
    """N = 0 is defined as 0 (mmrazor's empty mean would be NaN; see wsld.py)."""
    student, teacher, labels = make_batch(0, 10, dtype=dtype, device=kernel_device)
    terms, grad = loss_and_grad(impl, student, teacher, labels, tau=2.0, loss_weight=1, ce_weight=1)
    assert [float(v) for v in terms] == [0.0, 0.0, 0.0, 0.0]
    assert grad.shape == (0, 10) and grad.device == student.device


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(impl, dtype, cpu_capability):
    """Logits around +-1e4 stay finite and exact (max subtraction before exp)."""
    student, teacher, labels = make_batch(8, 300, dtype=torch.float64, seed=5)
    student = (student.detach().sign() * 1e4 + student.detach()).to(dtype)
    teacher = (teacher.sign() * 1e4 - teacher).to(dtype)
    terms, grad = loss_and_grad(impl, student, teacher, labels, tau=2.0, loss_weight=1, ce_weight=1)
    truth = wsld_float64(student, teacher, labels, tau=2.0, loss_weight=1, ce_weight=1)
    assert torch.isfinite(terms.total) and torch.isfinite(grad).all()
    assert float(terms.total) == pytest.approx(truth["total"], rel=1e-5)
    assert_grad_close(grad.float(), truth["grad"], rtol=1e-2, atol_fraction=1e-2)


# ---------------------------------------------------------------------------------------------
# Fused against reference: random shapes, dtypes, layouts
# ---------------------------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Gradient tolerance relative to max |grad|: one rounding of the logits' dtype, else fp32 noise.
_GRAD_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (contiguous, transposed, strided, offset)."""
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1] + 1, dtype=x.dtype, device=x.device)
        wide[:, 1::2] = x
        return wide[:, 1::2]
    if kind == "offset":  # a view one element into its storage: unaligned rows
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    return x


CHECKED_CASES: list[tuple] = []  # lets a run confirm the sweep really executed its cases
_PROPERTY_SPACE = {
    "rows": list(range(0, 25)),
    "classes": [1, 2, 3, 7, 8, 9, 16, 31, 100, 257, 1000, 1031, 2100],
    "dtype": _DTYPES,
    "tau": [1.0, 2.0, 4.0, 0.5, 1.7],
    "scale": [0.1, 3.0, 30.0],
    "layout": ["contiguous", "transposed", "strided", "offset"],
    "ce_weight": [0.0, 1.0, 0.3],
}


def check_fused_matches_reference(rows, classes, dtype, tau, scale, layout, ce_weight, seed):
    CHECKED_CASES.append((rows, classes, dtype, layout))
    student, teacher, labels = make_batch(rows, classes, dtype=dtype, scale=scale, seed=seed)
    student = _layout(student.detach(), layout)
    teacher = _layout(teacher, layout)
    labels = labels.repeat_interleave(2)[::2]  # non-contiguous labels too
    kwargs = {"tau": tau, "loss_weight": 2.5, "ce_weight": ce_weight}
    fused, fused_grad = loss_and_grad("fused", student, teacher, labels, **kwargs)
    ref, ref_grad = loss_and_grad("reference", student, teacher, labels, **kwargs)
    value_rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for name in LossTerms._fields:
        torch.testing.assert_close(
            getattr(fused, name), getattr(ref, name), rtol=value_rtol, atol=1e-7, msg=name
        )
    assert fused_grad.dtype == dtype and fused_grad.shape == student.shape
    tol = _GRAD_TOL[dtype]
    # Absolute floors: q - p cancels when both are near 1, leaving a few ulps of the accumulate
    # type times the gradient's prefactor; below fp16's normal range, the subnormal spacing.
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    cancellation = 8 * acc_eps * (2.5 * tau + ce_weight) / max(rows, 1)
    info = torch.finfo(dtype)
    subnormal = 2 * info.smallest_normal * info.eps
    scale = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    torch.testing.assert_close(
        fused_grad.double(),
        ref_grad.double(),
        rtol=tol,
        atol=tol * scale + cancellation + subnormal,
    )


if given is not None:

    @needs_fused
    @settings(
        max_examples=60,
        deadline=None,
        database=None,  # no .hypothesis/ folder in the checkout
        derandomize=True,  # the same examples in every CI run
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        rows=st.sampled_from(_PROPERTY_SPACE["rows"]),
        classes=st.sampled_from(_PROPERTY_SPACE["classes"]),
        dtype=st.sampled_from(_PROPERTY_SPACE["dtype"]),
        tau=st.sampled_from(_PROPERTY_SPACE["tau"]),
        scale=st.sampled_from(_PROPERTY_SPACE["scale"]),
        layout=st.sampled_from(_PROPERTY_SPACE["layout"]),
        ce_weight=st.sampled_from(_PROPERTY_SPACE["ce_weight"]),
        seed=st.integers(0, 2**16),
    )
    def test_fused_matches_reference(
        cpu_capability, rows, classes, dtype, tau, scale, layout, ce_weight, seed
    ):
        check_fused_matches_reference(rows, classes, dtype, tau, scale, layout, ce_weight, seed)

else:

    @needs_fused
    def test_fused_matches_reference(cpu_capability):
        rng = random.Random(0)
        for _ in range(60):
            case = {name: rng.choice(values) for name, values in _PROPERTY_SPACE.items()}
            check_fused_matches_reference(**case, seed=rng.randrange(2**16))


@needs_fused
def test_mixed_dtypes_promote(cpu_capability):
    """A bfloat16 student with a float32 teacher computes at float32; grad stays bfloat16."""
    student, teacher, labels = make_batch(6, 40, dtype=torch.bfloat16, seed=6)
    teacher = teacher.float() + 0.01
    kwargs = {"tau": 2.0, "loss_weight": 1.0, "ce_weight": 1.0}
    fused, fused_grad = loss_and_grad("fused", student, teacher, labels, **kwargs)
    ref, ref_grad = loss_and_grad("reference", student, teacher, labels, **kwargs)
    torch.testing.assert_close(fused.total, ref.total, rtol=2e-6, atol=0)
    assert fused_grad.dtype == torch.bfloat16
    assert_grad_close(fused_grad, ref_grad, rtol=1e-2, atol_fraction=1e-2)


@needs_fused
@pytest.mark.parametrize(
    ("rows", "classes", "dtype"), [(100, 500, torch.float32), (512, 21843, torch.bfloat16)]
)
def test_deterministic(kernel_device, rows, classes, dtype):
    """Bit-identical twice, also for a batch split across threads (CPU) or blocks (CUDA)."""
    student, teacher, labels = make_batch(rows, classes, dtype=dtype, seed=7, device=kernel_device)
    first, grad_first = loss_and_grad(
        "fused", student, teacher, labels, tau=2, loss_weight=1, ce_weight=1
    )
    second, grad_second = loss_and_grad(
        "fused", student, teacher, labels, tau=2, loss_weight=1, ce_weight=1
    )
    assert torch.equal(first.total, second.total) and torch.equal(grad_first, grad_second)


# ---------------------------------------------------------------------------------------------
# Fused against reference and float64, fixed cases on every kernel build (CPU here, CUDA on a GPU)
# ---------------------------------------------------------------------------------------------

# Gradient tolerance relative to max |grad| on any device (a CUDA row sums in another order).
_DEVICE_GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_fused_matches(student, teacher, labels, *, tau, loss_weight=2.5, ce_weight=1.0):
    """Fused against the reference on the same device (terms and gradient), and its terms
    against ``wsld_float64`` on the CPU. Returns the fused terms and gradient."""
    kwargs = {"tau": tau, "loss_weight": loss_weight, "ce_weight": ce_weight}
    fused, fused_grad = loss_and_grad("fused", student, teacher, labels, **kwargs)
    ref, ref_grad = loss_and_grad("reference", student, teacher, labels, **kwargs)
    truth = wsld_float64(student.cpu(), teacher.cpu(), labels.cpu(), **kwargs)
    for name in LossTerms._fields:
        value = getattr(fused, name)
        torch.testing.assert_close(
            value, getattr(ref, name), rtol=1e-5, atol=1e-6, msg=f"{name}: fused vs reference"
        )
        torch.testing.assert_close(
            float(value), truth[name], rtol=2e-5, atol=1e-6, msg=f"{name}: fused vs float64"
        )
    assert fused_grad.dtype == student.dtype and fused_grad.device == student.device
    tol = _DEVICE_GRAD_TOL[student.dtype]
    info = torch.finfo(student.dtype)
    # q - p cancels when both are near 1 (a few float32 ulps times the prefactor); below
    # float16's normal range, the subnormal spacing.
    floor = 8 * 1.2e-7 * (loss_weight * tau + ce_weight) / max(student.shape[0], 1)
    floor += 2 * info.smallest_normal * info.eps
    scale = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    torch.testing.assert_close(
        fused_grad.double(), ref_grad.double(), rtol=tol, atol=tol * scale + floor, msg="grad"
    )
    return fused, fused_grad


# The kernels' three exp paths (tau 1, 2, other: wsld.h TauMode) on shapes that take each row
# mapping and vector tail, then the realistic shapes at the recipe's tau.
_SWEEP = [
    *(
        (rows, classes, tau)
        for rows, classes in [(33, 1031), (17, 3), (5, 8), (3, 40000)]
        for tau in (1.0, 2.0, 4.0)
    ),
    (256, 1000, 2.0),
    (1024, 1000, 2.0),
    (128, 21843, 2.0),
]


@needs_fused
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
@pytest.mark.parametrize(("rows", "classes", "tau"), _SWEEP)
def test_fused_matches_reference_and_float64(kernel_device, dtype, rows, classes, tau):
    """Odd, tiny and 40,000-class rows (vector-load heads and tails; several CUDA blocks' worth
    of columns), and the ImageNet (1000) and ImageNet-21k (21843) shapes."""
    batch = make_batch(rows, classes, dtype=dtype, seed=rows + classes, device=kernel_device)
    assert_fused_matches(*batch, tau=tau)


@needs_fused
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
@pytest.mark.parametrize("classes", [1024, 1025, 2048, 2049])
def test_fused_on_both_sides_of_the_row_mappings(kernel_device, dtype, classes):
    """CUDA switches from a warp per row to a block per row above 32 lanes x 8 loads of 16 bytes
    (1024 float32 or 2048 16-bit classes, ``warp_per_row`` in wsld_cuda.cu); the CPU kernel walks
    rows in chunks of 1024 (``kChunk`` in wsld_cpu_kernel.h). Each side of both boundaries."""
    batch = make_batch(9, classes, dtype=dtype, seed=classes, device=kernel_device)
    assert_fused_matches(*batch, tau=2.0)


@needs_fused
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
@pytest.mark.parametrize(("rows", "classes"), [(64, 1000), (7, 1031), (4, 21843)])
def test_fused_non_contiguous_and_misaligned(kernel_device, dtype, layout, rows, classes):
    student, teacher, labels = make_batch(rows, classes, dtype=dtype, seed=3, device=kernel_device)
    labels = labels.repeat_interleave(2)[::2]  # strided labels too
    student, teacher = _layout(student.detach(), layout), _layout(teacher, layout)
    assert_fused_matches(student, teacher, labels, tau=2.0)


@needs_fused
@pytest.mark.parametrize("dtype", _KERNEL_DTYPES)
@pytest.mark.parametrize(
    "case",
    ["wsld_only", "uniform_rows", "confident_teacher", "two_classes", "huge_logits"],
)
def test_fused_edge_inputs(kernel_device, dtype, case):
    """The hand-computed cases above (C = 1 and N = 0 are there too), in every dtype and on
    every device, against the reference."""
    device = kernel_device
    big = 6e4 if dtype == torch.float16 else 1e4  # float16: near its largest finite value
    student, teacher, labels = make_batch(32, 1000, dtype=dtype, seed=4, device=device)
    kwargs = {"tau": 2.0}
    if case == "wsld_only":
        kwargs["ce_weight"] = 0.0
    elif case == "uniform_rows":
        student = torch.full_like(student, 0.5)
        teacher = torch.full_like(teacher, -2.0)
        labels = torch.arange(32, device=device) * 7
    elif case == "confident_teacher":
        teacher = torch.zeros_like(teacher)
        teacher[torch.arange(32, device=device), labels] = big
    elif case == "two_classes":
        student, teacher, labels = make_batch(16, 2, dtype=dtype, seed=5, device=device)
    elif case == "huge_logits":
        student = (student.detach().sign() * big + student.detach()).to(dtype)
        teacher = (teacher.sign() * big - teacher).to(dtype)
    fused, grad = assert_fused_matches(student, teacher, labels, **kwargs)
    assert torch.isfinite(fused.total) and torch.isfinite(grad).all()
    if case == "confident_teacher":  # CE_t = 0 makes the ratio huge: w = 1 exactly
        weight = torch.ops.fastkd.wsld(student, teacher, labels, 2.0, 1.0)[1][:, 5]  # kWeight
        assert torch.all(weight == 1.0), weight


@needs_fused
def test_fused_int32_labels(kernel_device):
    """int32 labels give exactly what int64 ones do."""
    student, teacher, labels = make_batch(
        64, 1000, dtype=torch.float16, seed=6, device=kernel_device
    )
    terms, grad = assert_fused_matches(student, teacher, labels.int(), tau=2.0)
    kwargs = {"tau": 2.0, "loss_weight": 2.5, "ce_weight": 1.0}
    terms64, grad64 = loss_and_grad("fused", student, teacher, labels, **kwargs)
    assert torch.equal(terms.total, terms64.total) and torch.equal(grad, grad64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_synchronizes_the_host():
    """Forward and backward of the fused loss under CUDA's sync debug mode set to "error": any
    host synchronization (an .item(), a device-to-host copy, a label check) raises."""
    student, teacher, labels = make_batch(256, 1000, dtype=torch.float16, seed=10, device="cuda")
    kwargs = {"tau": 2.0, "loss_weight": 2.5, "ce_weight": 1.0, "impl": "fused"}
    torch.autograd.grad(wsld_ce_loss(student, teacher, labels, **kwargs).total, student)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = wsld_ce_loss(student, teacher, labels, **kwargs)
        torch.autograd.grad(terms.total, student)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# API contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_loss_terms_contract(impl, kernel_device):
    student, teacher, labels = make_batch(8, 20, seed=8, device=kernel_device)
    teacher.requires_grad_(True)
    terms = wsld_ce_loss(
        student, teacher, labels, tau=2.0, loss_weight=2.5, ce_weight=1.0, impl=impl
    )
    assert isinstance(terms, LossTerms)
    assert terms.total.requires_grad
    for name in ("ce", "wsld", "weight_mean"):
        value = getattr(terms, name)
        assert not value.requires_grad and value.dim() == 0 and value.dtype == torch.float32
    torch.testing.assert_close(terms.total, terms.ce * 1.0 + terms.wsld)
    terms.total.backward()
    assert student.grad is not None
    assert teacher.grad is None  # the teacher never gets a gradient
    wsld_only = wsld_loss(student, teacher, labels, tau=2.0, loss_weight=2.5, impl=impl)
    torch.testing.assert_close(wsld_only, terms.wsld, rtol=1e-6, atol=0)


def test_module_form():
    student, teacher, labels = make_batch(8, 20, seed=9)
    module = WSLDLoss(tau=2.0, loss_weight=2.5)
    assert "tau=2.0" in repr(module)
    torch.testing.assert_close(
        module(student, teacher, labels),
        wsld_loss(student, teacher, labels, tau=2.0, loss_weight=2.5, impl="reference"),
        rtol=2e-6,
        atol=0,
    )
    with pytest.raises(ValueError, match="impl must be one of"):
        WSLDLoss(impl="triton")


def test_auto_uses_fused_when_built():
    assert wsld._use_fused("auto", torch.zeros(1, 1)) == HAVE_FUSED
    assert wsld._use_fused("reference", torch.zeros(1, 1)) is False


def test_torch_func_transforms_work_with_auto():
    """Per-sample gradients (torch.func.grad under vmap), the research use of torch.func: with
    impl="auto" they fall back to the reference (the op's C++ autograd cannot run under them),
    and they equal the per-row gradients of the loss computed one sample at a time."""
    student, teacher, labels = make_batch(6, 11, seed=4)

    def loss_of_one(s, t, y):
        return wsld_loss(s[None], t[None], y[None], tau=2.0, loss_weight=2.5, impl="auto")

    per_sample = torch.func.vmap(torch.func.grad(loss_of_one))(student, teacher, labels)
    for i in range(student.shape[0]):
        row = student[i : i + 1].clone().requires_grad_(True)
        loss = wsld_loss(row, teacher[i : i + 1], labels[i : i + 1], tau=2.0, loss_weight=2.5)
        (expected,) = torch.autograd.grad(loss, row)
        torch.testing.assert_close(per_sample[i], expected[0], rtol=1e-5, atol=1e-7)
    # Outside the transforms "auto" is still the fused op.
    assert wsld._use_fused("auto", student) == HAVE_FUSED
    if HAVE_FUSED:  # asked for explicitly, the fused op under grad is PyTorch's own clear error
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.grad(
                lambda s: wsld_loss(s, teacher, labels, tau=2.0, loss_weight=2.5, impl="fused")
            )(student)


def test_fused_without_extension_raises(monkeypatch):
    monkeypatch.setattr(ops, "extension", None)
    monkeypatch.setattr(ops, "_FUSED_DEVICE_TYPES", frozenset())
    student, teacher, labels = make_batch(4, 5)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        wsld_loss(student, teacher, labels, impl="fused")
    # auto falls back to the reference implementation.
    expected = wsld_loss(student, teacher, labels, impl="reference")
    torch.testing.assert_close(wsld_loss(student, teacher, labels, impl="auto"), expected)


@pytest.mark.slow
def test_missing_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings; sys.modules['fastkd._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch; from fastkd.losses import wsld_loss, fused_available\n"
        "    import fastkd.losses.ops\n"
        "    s = torch.randn(3, 4); y = torch.tensor([0, 1, 2])\n"
        "    wsld_loss(s, s, y); wsld_loss(s, s, y)\n"
        "msgs = [str(w.message) for w in caught if 'fastkd._C' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'pip install --no-build-isolation -e .' in msgs[0], msgs\n"
        "assert not fused_available('cpu')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda s, t, y: (s, t, y + 100), ValueError, "out of range|must lie in"),
        (lambda s, t, y: (s, t, y - 100), ValueError, "out of range|must lie in"),
        (lambda s, t, y: (s, t, y.float()), TypeError, "integer"),
        (lambda s, t, y: (s, t, y.bool()), TypeError, "integer"),
        (lambda s, t, y: (s, t[:, :-1], y), ValueError, "shape"),
        (lambda s, t, y: (s, t, y[:-1]), ValueError, "labels must have shape"),
        (lambda s, t, y: (s[0], t[0], y), ValueError, "2-D"),
        (lambda s, t, y: (s[:, :0], t[:, :0], y), ValueError, "at least one class"),
        (lambda s, t, y: (s.int(), t, y), TypeError, "float32, float16, bfloat16 or float64"),
        (lambda s, t, y: (s, t, y.to("meta")), ValueError, "one device"),
    ],
)
def test_bad_inputs_raise_clearly(impl, mutate, error, match):
    student, teacher, labels = make_batch(4, 6, requires_grad=False)
    student, teacher, labels = mutate(student, teacher, labels)
    with pytest.raises(error, match=match):
        wsld_ce_loss(student, teacher, labels, tau=2.0, loss_weight=1.0, ce_weight=1.0, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_tau_raises(impl, tau):
    student, teacher, labels = make_batch(2, 3)
    with pytest.raises(ValueError, match="tau"):
        wsld_loss(student, teacher, labels, tau=tau, impl=impl)


def test_bad_impl_raises():
    student, teacher, labels = make_batch(2, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        wsld_loss(student, teacher, labels, impl="cuda")


# ---------------------------------------------------------------------------------------------
# Autocast, torch.compile, KD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_bfloat16_logits_give_float32_loss(impl):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 10)
    features = torch.randn(8, 16)
    teacher = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
        assert logits.dtype == torch.bfloat16
        terms = wsld_ce_loss(
            logits, teacher.bfloat16(), labels, tau=2.0, loss_weight=2.5, ce_weight=1.0, impl=impl
        )
    assert terms.total.dtype == torch.float32
    terms.total.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    expected = wsld_ce_loss(
        logits.detach(),
        teacher.bfloat16(),
        labels,
        tau=2.0,
        loss_weight=2.5,
        ce_weight=1.0,
        impl="reference",
    )
    torch.testing.assert_close(terms.total, expected.total, rtol=2e-6, atol=0)


def _compiled_step(impl: str):
    def step(student_logits, teacher_logits, labels):
        terms = wsld_ce_loss(
            student_logits,
            teacher_logits,
            labels,
            tau=2.0,
            loss_weight=2.5,
            ce_weight=1.0,
            impl=impl,
        )
        wsld_value = wsld_loss(student_logits, teacher_logits, labels, 2.0, 2.5, impl=impl)
        return terms.total + 0.0 * wsld_value, terms.wsld, terms.weight_mean

    return step


@pytest.mark.parametrize(
    ("impl", "backend"),
    [
        pytest.param("fused", "aot_eager", marks=needs_fused),
        pytest.param("fused", "inductor", marks=[needs_fused, pytest.mark.slow]),
        ("reference", "aot_eager"),
        ("auto", "aot_eager"),
    ],
)
def test_compile_fullgraph_matches_eager(impl, backend):
    torch._dynamo.reset()
    step = _compiled_step(impl)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    student, teacher, labels = make_batch(16, 100, seed=10)
    eager_out = step(student, teacher, labels)
    (eager_grad,) = torch.autograd.grad(eager_out[0], student)
    compiled_out = compiled(student, teacher, labels)
    (compiled_grad,) = torch.autograd.grad(compiled_out[0], student)
    for a, b in zip(compiled_out, eager_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-8)


def test_kd_loss():
    student, teacher, labels = make_batch(12, 30, seed=11)
    tau, loss_weight = 4.0, 0.9
    value = kd_loss(student, teacher, tau=tau, loss_weight=loss_weight)
    expected_input = student.detach()
    expected = (
        F.kl_div(
            F.log_softmax(expected_input.double() / tau, 1),
            F.log_softmax(teacher.double() / tau, 1),
            log_target=True,
            reduction="batchmean",
        )
        * loss_weight
        * tau**2
    )
    assert value.dtype == torch.float32
    assert value.detach().item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert student.grad is not None
    assert float(kd_loss(student[:0], teacher[:0]).detach()) == 0.0
    with pytest.raises(ValueError, match="shape"):
        kd_loss(student, teacher[:, :-1])


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_kd_loss_bad_tau_raises(tau):
    student, teacher, _ = make_batch(2, 3)
    with pytest.raises(ValueError, match="tau must be a positive finite number"):
        kd_loss(student, teacher, tau=tau)


def test_env_capability_validation(monkeypatch):
    if not HAVE_FUSED:
        pytest.skip("fastkd._C is not built")
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", "avx512")
    student, teacher, labels = make_batch(2, 3)
    with pytest.raises(ValueError, match="FASTKD_CPU_CAPABILITY"):
        wsld_loss(student, teacher, labels, impl="fused")
