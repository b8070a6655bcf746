"""The custom ops themselves (torch.ops.fastkd.*): registration, opcheck, gradcheck, row stats,
errors, and a batch past 2**31 elements (on CUDA, marked gpu; at a small size on the CPU).

Loss-level behaviour (values against float64, edge cases, compile, every device) is in
test_losses.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from fastkd.losses import ops, wsld_ce_loss, wsld_loss

if ops.extension is None:
    pytestmark = pytest.mark.skip(reason=f"fastkd._C is not built (run `{ops.BUILD_COMMAND}`)")

CAPABILITIES = (
    ops.extension.cpu_capabilities.split(",") if ops.extension is not None else ["default"]
)


def test_extension_is_built():
    """CI must build fastkd._C: without it every fused-op test would silently skip."""
    assert ops.extension is not None
    assert ops.fused_available("cpu")


@pytest.fixture(params=["default", "avx2"])
def cpu_capability(request, monkeypatch):
    if request.param not in CAPABILITIES:
        pytest.skip(f"no {request.param} CPU kernel on this machine/build")
    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", request.param)
    return request.param


def _nvcc_available() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_cuda_kernels_registered_when_built_with_toolkit(name):
    """When the build found nvcc, _C must carry CUDA kernels (CI proves the CUDA part compiled)."""
    ext = ops.extension
    if not ext.with_cuda:
        if ext.cuda_toolkit_found:
            pytest.skip("built with FASTKD_BUILD_CUDA=0 although a CUDA toolkit was present")
        if _nvcc_available() and torch.version.cuda is not None:
            pytest.fail(
                "nvcc is available but fastkd._C was built without CUDA kernels: rebuild with "
                f"`{ops.BUILD_COMMAND}` (setup.py did not detect the toolkit)"
            )
        pytest.skip("fastkd._C was built without a CUDA toolkit")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert "cuda" in ops._FUSED_DEVICE_TYPES


@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_cpu_kernels_and_tags(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    op = getattr(torch.ops.fastkd, name.split("::")[1]).default
    assert torch.Tag.pt2_compliant_tag in op.tags


def _sample_inputs(requires_grad: bool) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)

    def logits(rows, classes, dtype=torch.float32, scale=2.0):
        x = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale
        return x.to(dtype).requires_grad_(requires_grad)

    def labels(rows, classes):
        return torch.randint(0, classes, (rows,), generator=gen)

    transposed = torch.randn(33, 9, generator=gen).t().requires_grad_(requires_grad)
    return [
        (logits(8, 10), logits(8, 10).detach(), labels(8, 10), 2.0, 2.5),
        (logits(3, 1), logits(3, 1).detach(), labels(3, 1), 1.0, 1.0),
        (logits(0, 5), logits(0, 5).detach(), labels(0, 5), 4.0, 1.0),
        (
            logits(5, 1031, torch.bfloat16),
            logits(5, 1031, torch.bfloat16).detach(),
            labels(5, 1031),
            2.0,
            1.0,
        ),
        (logits(4, 17, torch.float16), logits(4, 17).detach(), labels(4, 17), 3.0, 0.5),
        (
            logits(4, 6, torch.float64),
            logits(4, 6, torch.float64).detach(),
            labels(4, 6).int(),
            1.5,
            2.0,
        ),
        (transposed, torch.randn(9, 33, generator=gen), labels(9, 33), 2.0, 1.0),
    ]


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward_ops(requires_grad, cpu_capability):
    for sample in _sample_inputs(requires_grad):
        torch.library.opcheck(torch.ops.fastkd.wsld.default, sample)
        torch.library.opcheck(torch.ops.fastkd.wsld_ce.default, (*sample, 0.7))


def test_opcheck_backward_op(cpu_capability):
    for student, teacher, labels, tau, loss_weight in _sample_inputs(requires_grad=False):
        *_, row_stats = torch.ops.fastkd.wsld_ce(student, teacher, labels, tau, loss_weight, 1.0)
        grad = torch.tensor(1.3, dtype=row_stats.dtype)
        for ce_weight in (0.0, 0.6):
            args = (grad, student, teacher, labels, row_stats, tau, loss_weight, ce_weight)
            torch.library.opcheck(torch.ops.fastkd.wsld_backward.default, args)


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_gradcheck_float64(tau, cpu_capability):
    """Finite differences of the fused ops against their backward op, in float64.

    By definition no gradient flows through w (mmrazor computes it from detached logits), so a
    finite difference sees dw/ds where the op, correctly, does not. The teacher here is sure of
    each label (margin 12, CE_t ~ 1e-4), which makes CE_s / (CE_t + 1e-7) large and w = 1 locally
    constant: every other part of the gradient is then checked exactly. The w-weighted gradient
    in general is checked against the closed form in test_losses.py.
    """
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 9, (6,), generator=gen)
    teacher = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    teacher[torch.arange(6), labels] += 12.0
    _, stats = torch.ops.fastkd.wsld(student.detach(), teacher, labels, tau, 1.0)
    assert torch.all(stats[:, 5] == 1.0), "the setup must make w constant"

    def wsld_only(s):
        return wsld_loss(s, teacher, labels, tau=tau, loss_weight=2.5, impl="fused")

    def total(s):
        return wsld_ce_loss(
            s, teacher, labels, tau=tau, loss_weight=2.5, ce_weight=0.8, impl="fused"
        ).total

    assert torch.autograd.gradcheck(wsld_only, (student,))
    assert torch.autograd.gradcheck(total, (student,))
    # Transposed (non-contiguous) input through the same ops.
    student_t = student.detach().t().contiguous().t().requires_grad_(True)
    assert torch.autograd.gradcheck(total, (student_t,))


def test_gradcheck_detects_weight_dependence():
    """Guard for the test above: with w varying, finite differences must disagree (w detached)."""
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 5, (4,), generator=gen)
    assert not torch.autograd.gradcheck(
        lambda s: wsld_loss(s, teacher, labels, tau=2.0, impl="fused"),
        (student,),
        raise_exception=False,
    )


def test_autograd_formula_is_registered_in_cpp():
    """Both forward ops carry their autograd formula on the Autograd key, from C++ (so eager
    backward never enters Python)."""
    for name in ("fastkd::wsld", "fastkd::wsld_ce"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"), name
        dump = torch._C._dispatch_dump(name)
        autograd_lines = [line for line in dump.splitlines() if line.startswith("Autograd")]
        assert autograd_lines and "wsld.cpp" in autograd_lines[0], dump


def test_double_backward_raises():
    """The gradient is not itself differentiable: asking for it is an error, not a silent 0."""
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 6, (3,), generator=gen)
    total = torch.ops.fastkd.wsld_ce(student, teacher, labels, 2.0, 2.5, 1.0)[0]
    (grad,) = torch.autograd.grad(total, student, create_graph=True)
    with pytest.raises(RuntimeError, match="fastkd::wsld_backward is not implemented"):
        grad.sum().backward()


def test_op_autograd_matches_reference(cpu_capability):
    """Calling the ops directly differentiates them (the C++ formula, what torch.compile traces
    too) to the reference gradient; only ``total`` requires grad; the teacher gets none."""
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(12, 300, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(12, 300, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (12,), generator=gen)
    total, ce, wsld, weight_mean, row_stats = torch.ops.fastkd.wsld_ce(
        student, teacher, labels, 2.0, 2.5, 0.7
    )
    assert total.requires_grad
    assert not any(t.requires_grad for t in (ce, wsld, weight_mean, row_stats))
    (grad_op,) = torch.autograd.grad(total, student)
    reference = wsld_ce_loss(
        student, teacher, labels, tau=2.0, loss_weight=2.5, ce_weight=0.7, impl="reference"
    )
    (grad_ref,) = torch.autograd.grad(reference.total, student)
    torch.testing.assert_close(grad_op, grad_ref, rtol=1e-12, atol=1e-14)

    loss, _ = torch.ops.fastkd.wsld(student, teacher, labels, 2.0, 2.5)
    (grad_op,) = torch.autograd.grad(loss * 3.0, student)  # the incoming gradient is applied
    reference = wsld_loss(student, teacher, labels, 2.0, 2.5, impl="reference")
    (grad_ref,) = torch.autograd.grad(reference * 3.0, student)
    torch.testing.assert_close(grad_op, grad_ref, rtol=1e-12, atol=1e-14)

    # The teacher never receives a gradient, even when it requires one.
    torch.ops.fastkd.wsld(student, teacher, labels, 2.0, 2.5)[0].backward()
    assert teacher.grad is None and student.grad is not None
    # A student that needs no gradient gets none computed, whatever the teacher asks.
    frozen = student.detach()
    total = torch.ops.fastkd.wsld_ce(frozen, teacher, labels, 2.0, 2.5, 0.7)[0]
    total.backward()
    assert teacher.grad is None


def test_row_stats_columns(cpu_capability):
    """row_stats holds what the backward needs, in the documented column order (wsld.h)."""
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 40, dtype=torch.float64, generator=gen) * 3
    t = torch.randn(5, 40, dtype=torch.float64, generator=gen) * 3
    y = torch.randint(0, 40, (5,), generator=gen)
    tau = 1.7
    loss, stats = torch.ops.fastkd.wsld(s, t, y, tau, 1.0)
    assert stats.shape == (5, ops.NUM_STATS) and stats.dtype == torch.float64
    max_s, max_t = s.max(1).values, t.max(1).values
    ce_s = -F.log_softmax(s, 1).gather(1, y[:, None]).squeeze(1)
    ce_t = -F.log_softmax(t, 1).gather(1, y[:, None]).squeeze(1)
    weight = 1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0))
    soft_ce = -(F.softmax(t / tau, 1) * F.log_softmax(s / tau, 1)).sum(1)
    expected = torch.stack(
        [
            max_s,
            max_t,
            1 / torch.exp((s - max_s[:, None]) / tau).sum(1),
            1 / torch.exp((t - max_t[:, None]) / tau).sum(1),
            1 / torch.exp(s - max_s[:, None]).sum(1),
            weight,
            soft_ce,
            ce_s,
        ],
        dim=1,
    )
    torch.testing.assert_close(stats, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, tau**2 * (weight * soft_ce).mean(), rtol=1e-12, atol=0)


def test_backward_op_scales_with_upstream_grad(cpu_capability):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 11, generator=gen)
    t = torch.randn(4, 11, generator=gen)
    y = torch.randint(0, 11, (4,), generator=gen)
    *_, stats = torch.ops.fastkd.wsld_ce(s, t, y, 2.0, 2.5, 1.0)
    one = torch.ops.fastkd.wsld_backward(torch.tensor(1.0), s, t, y, stats, 2.0, 2.5, 1.0)
    three = torch.ops.fastkd.wsld_backward(torch.tensor(3.0), s, t, y, stats, 2.0, 2.5, 1.0)
    torch.testing.assert_close(three, 3 * one)
    # ce_weight only: the softmax-minus-onehot gradient of the mean cross-entropy.
    ce_only = torch.ops.fastkd.wsld_backward(torch.tensor(1.0), s, t, y, stats, 2.0, 0.0, 1.0)
    s_ref = s.clone().requires_grad_(True)
    F.cross_entropy(s_ref, y).backward()
    torch.testing.assert_close(ce_only, s_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld(s, t, y + 5, 2.0, 1.0),
            ValueError,
            r"labels\[0\] = 5 is out of range for 5 classes",
        ),
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld(s, t, y.float(), 2.0, 1.0),
            TypeError,
            "labels must be an integer tensor",
        ),
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld(s, t[:, :4], y, 2.0, 1.0),
            ValueError,
            "teacher_logits has shape",
        ),
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld(s, t, y, 0.0, 1.0),
            ValueError,
            "tau must be a positive finite number",
        ),
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld_backward(
                torch.ones(2), s, t, y, st, 2.0, 1.0, 0.0
            ),
            ValueError,
            "grad must hold one value",
        ),
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld_backward(
                torch.tensor(1.0), s, t, y, st[:, :4], 2.0, 1.0, 0.0
            ),
            ValueError,
            "row_stats must have shape",
        ),
        (
            lambda s, t, y, st: torch.ops.fastkd.wsld_backward(
                torch.tensor(1.0), s, t, y, st.double(), 2.0, 1.0, 0.0
            ),
            TypeError,
            "row_stats must be Float",
        ),
    ],
)
def test_op_errors(call, error, match):
    s, t = torch.randn(5, 5), torch.randn(5, 5)
    y = torch.arange(5)
    _, stats = torch.ops.fastkd.wsld(s, t, y, 2.0, 1.0)
    with pytest.raises(error, match=match):
        call(s, t, y, stats)


needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_rows_past_element_2_31(device):
    """The last rows of a 2.1e9-element float16 batch (past 2**31: 64-bit offsets in the forward
    and backward kernels) against the same rows computed alone and against the reference. On the
    CPU the same check runs at 3e6 elements, so that the test itself is exercised in CI."""
    rows, classes = (100_000, 21_475) if device == "cuda" else (3_000, 1_000)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        needed = 3 * rows * classes * 2 + (1 << 30)
        if free < needed:
            pytest.skip(f"needs {needed / 2**30:.1f} GiB free on the GPU, has {free / 2**30:.1f}")
    gen = torch.Generator(device=device).manual_seed(12)
    student = torch.randn(rows, classes, device=device, dtype=torch.float16, generator=gen)
    teacher = torch.randn(rows, classes, device=device, dtype=torch.float16, generator=gen)
    labels = torch.randint(0, classes, (rows,), device=device, generator=gen)
    *_, stats = torch.ops.fastkd.wsld_ce(student, teacher, labels, 2.0, 1.0, 1.0)
    # An upstream gradient of N undoes the 1/N of the mean, keeping float16 gradients of a
    # 100k-row batch out of the subnormal range.
    upstream = torch.full((), float(rows), device=device)
    grad = torch.ops.fastkd.wsld_backward(upstream, student, teacher, labels, stats, 2.0, 1.0, 1.0)
    tail = slice(rows - 64, rows)
    s_tail, t_tail, y_tail = student[tail].clone(), teacher[tail].clone(), labels[tail]
    *_, tail_stats = torch.ops.fastkd.wsld_ce(s_tail, t_tail, y_tail, 2.0, 1.0, 1.0)
    torch.testing.assert_close(stats[tail], tail_stats, rtol=1e-5, atol=1e-6)
    s_ref = s_tail.requires_grad_(True)
    reference = wsld_ce_loss(
        s_ref, t_tail, y_tail, tau=2.0, loss_weight=1.0, ce_weight=1.0, impl="reference"
    )
    (ref_grad,) = torch.autograd.grad(reference.total, s_ref)
    expected = ref_grad.float() * 64  # the full batch's N / N = 1 per row; these 64 rows carry 1/64
    torch.testing.assert_close(
        grad[tail].float(), expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max())
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float64_is_rejected_on_cuda():
    """The CUDA kernels take float32, float16 and bfloat16; float64 (gradcheck) is CPU-only."""
    student = torch.randn(4, 10, device="cuda", dtype=torch.float64)
    labels = torch.arange(4, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        torch.ops.fastkd.wsld(student, student, labels, 2.0, 1.0)
