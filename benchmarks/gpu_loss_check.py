"""GPU acceptance check of the fused WSLD op: correctness, speed and memory bandwidth.

    python benchmarks/gpu_loss_check.py --json $OUT/loss_check.json

1. Correctness on the CUDA kernels against the reference implementation on the same device and a
   float64 CPU derivation: float32/float16/bfloat16, the three temperature code paths (tau 1, 2,
   other), both row mappings (warp per row, block per row), odd class counts and misaligned
   rows (vector-load heads and tails), non-contiguous inputs, the edge cases (uniform rows, a
   teacher certain of the label, C = 1, C = 2, N = 0, logits of +-1e4), int32 labels,
   determinism, no host synchronization (``torch.cuda.set_sync_debug_mode("error")``) and a
   tensor past 2**31 elements (64-bit offsets).
2. Timing against mmrazor's eager op sequence at 256x1000, 1024x1000, 128x21843 and 4096x21843
   (benchmarks/bench_loss.py), and achieved memory bandwidth against a measured
   device-to-device copy.
3. The goals: >= 10x faster than eager at 256x1000 float16; >= 70% of copy bandwidth at
   4096x21843.

Without a GPU it writes a JSON that says so and exits 0, so that the surrounding script and CI
can run it anywhere; ``--device cpu --quick`` runs the same checks on the CPU kernels to test
this script itself. Every check is recorded (pass/fail and numbers); one failing check does not
stop the others. Exit status 1 when a correctness check failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import bench_size, time_ms  # noqa: E402
from common import format_table, machine_info  # noqa: E402

from fastkd.losses import LossTerms, ops, wsld_ce_loss  # noqa: E402

TIMING_SIZES = ((256, 1000), (1024, 1000), (128, 21843), (4096, 21843))
# Rows (float16) also timed against torch.compile of the eager objective: a compile each.
INDUCTOR_SIZES = ((256, 1000), (4096, 21843))
DEVICE = torch.device("cuda")  # --device cpu tests the script's logic on the CPU kernels
QUICK = False  # --quick: fewer and smaller cases
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Checks:
    """Collects named pass/fail records; a raising check is recorded, not propagated."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def run(self, name: str, fn: Callable[[], dict[str, object] | None]) -> None:
        start = time.perf_counter()
        record: dict[str, object] = {"name": name}
        try:
            details = fn() or {}
            record.update(status="pass", **details)
        except Exception as error:  # noqa: BLE001 - every failure must be reported, not raised
            record.update(
                status="fail",
                error=f"{type(error).__name__}: {error}"[:2000],
                traceback=traceback.format_exc()[-3000:],
            )
        record["seconds"] = round(time.perf_counter() - start, 3)
        print(
            f"[{record['status']}] {name} ({record['seconds']} s)"
            + (f": {record.get('error')}" if record["status"] == "fail" else ""),
            flush=True,
        )
        self.records.append(record)

    @property
    def failed(self) -> list[str]:
        return [str(r["name"]) for r in self.records if r["status"] != "pass"]


def make_batch(rows, classes, dtype, *, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(rows, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    return student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE)


def relayout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values, other memory layout: transposed, strided columns, or a misaligned base."""
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    if kind == "offset":
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    return x


def terms_and_grad(impl, student, teacher, labels, **kwargs) -> tuple[LossTerms, torch.Tensor]:
    student = student.detach().clone().requires_grad_(True)
    terms = wsld_ce_loss(student, teacher, labels, impl=impl, **kwargs)
    terms.total.backward()
    return LossTerms(*(t.detach() for t in terms)), student.grad


def compare(student, teacher, labels, *, tau, loss_weight=2.5, ce_weight=1.0) -> dict:
    """Fused vs reference on the GPU (values and grads), and fused vs float64 on the CPU."""
    kwargs = {"tau": tau, "loss_weight": loss_weight, "ce_weight": ce_weight}
    fused, fused_grad = terms_and_grad("fused", student, teacher, labels, **kwargs)
    ref, ref_grad = terms_and_grad("reference", student, teacher, labels, **kwargs)
    truth, _ = terms_and_grad(
        "reference", student.double().cpu(), teacher.double().cpu(), labels.cpu(), **kwargs
    )
    for name in LossTerms._fields:
        torch.testing.assert_close(
            getattr(fused, name),
            getattr(ref, name),
            rtol=1e-5,
            atol=1e-6,
            msg=f"{name}: fused vs reference",
        )
        torch.testing.assert_close(
            getattr(fused, name).double().cpu(),
            getattr(truth, name),
            rtol=2e-5,
            atol=1e-6,
            msg=f"{name}: fused vs float64",
        )
    assert fused_grad.dtype == student.dtype, (fused_grad.dtype, student.dtype)
    tol = GRAD_TOL[student.dtype]
    rows = max(student.shape[0], 1)
    info = torch.finfo(student.dtype)
    floor = (
        8 * 1.2e-7 * (loss_weight * tau + ce_weight) / rows + 2 * info.smallest_normal * info.eps
    )
    scale = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    torch.testing.assert_close(
        fused_grad.double(),
        ref_grad.double(),
        rtol=tol,
        atol=tol * scale + floor,
        msg="grad: fused vs reference",
    )
    return {
        "total": float(fused.total),
        "grad_max_abs_diff": float((fused_grad.double() - ref_grad.double()).abs().max())
        if ref_grad.numel()
        else 0.0,
    }


def correctness_checks(checks: Checks) -> None:
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    shapes = [
        (256, 1000),
        (1024, 1000),
        (128, 21843),
        (33, 1031),
        (17, 3),
        (5, 8),
        (9, 2048),
        (9, 2049),
        (3, 40000),
    ]
    if QUICK:
        shapes = [(64, 1000), (33, 1031), (5, 8), (3, 4100)]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for rows, classes in shapes:
            for tau in (1.0, 2.0, 4.0):
                student, teacher, labels = make_batch(rows, classes, dtype, seed=rows + classes)
                checks.run(
                    f"values/{name}/{rows}x{classes}/tau={tau}",
                    lambda s=student, t=teacher, y=labels, tau=tau: compare(s, t, y, tau=tau),
                )
        for layout in ("transposed", "strided", "offset"):
            for rows, classes in [(64, 1000), (7, 1031), (4, 21843)]:
                student, teacher, labels = make_batch(rows, classes, dtype, seed=3)
                checks.run(
                    f"layout/{name}/{layout}/{rows}x{classes}",
                    lambda s=student, t=teacher, y=labels, k=layout: compare(
                        relayout(s, k), relayout(t, k), y[::1].repeat_interleave(2)[::2], tau=2.0
                    ),
                )
        checks.run(
            f"edge/{name}/wsld_only",
            lambda d=dtype: compare(*make_batch(64, 1000, d, seed=4), tau=2.0, ce_weight=0.0),
        )
        checks.run(f"edge/{name}/uniform_rows", lambda d=dtype: edge_uniform(d))
        checks.run(f"edge/{name}/confident_teacher", lambda d=dtype: edge_confident_teacher(d))
        for classes in (1, 2):
            checks.run(
                f"edge/{name}/C={classes}",
                lambda d=dtype, c=classes: compare(*make_batch(16, c, d, seed=5), tau=2.0),
            )
        checks.run(f"edge/{name}/N=0", lambda d=dtype: edge_empty(d))
        checks.run(f"edge/{name}/huge_logits", lambda d=dtype: edge_huge(d))
    checks.run(
        "labels/int32",
        lambda: compare(
            *(lambda s, t, y: (s, t, y.int()))(*make_batch(64, 1000, torch.float16, seed=6)),
            tau=2.0,
        ),
    )
    checks.run("deterministic", check_deterministic)
    checks.run("no_host_sync", check_no_host_sync)
    checks.run("teacher_gets_no_grad", check_teacher_no_grad)
    checks.run("float64_rejected_on_cuda", check_float64_rejected)
    checks.run("large_int64_offsets", check_large_offsets)


def edge_uniform(dtype) -> dict:
    student = torch.full((32, 1000), 0.5, device=DEVICE, dtype=dtype)
    teacher = torch.full((32, 1000), -2.0, device=DEVICE, dtype=dtype)
    labels = torch.arange(32, device=DEVICE) * 7
    return compare(student, teacher, labels, tau=2.0)


def edge_confident_teacher(dtype) -> dict:
    student, teacher, labels = make_batch(32, 1000, dtype, seed=7)
    teacher = torch.zeros_like(teacher)
    teacher[torch.arange(32), labels] = 1e4 if dtype != torch.float16 else 6e4
    out = compare(student, teacher, labels, tau=2.0)
    stats = torch.ops.fastkd.wsld(student, teacher, labels, 2.0, 1.0)[1]
    assert torch.all(stats[:, ops.NUM_STATS - 3] == 1.0), "w must be 1 when CE_t = 0"
    return out


def edge_empty(dtype) -> dict:
    student, teacher, labels = make_batch(0, 10, dtype)
    fused, grad = terms_and_grad(
        "fused", student, teacher, labels, tau=2.0, loss_weight=1.0, ce_weight=1.0
    )
    assert all(float(v) == 0.0 for v in fused) and grad.shape == (0, 10)
    return {}


def edge_huge(dtype) -> dict:
    student, teacher, labels = make_batch(16, 1000, dtype, seed=8)
    big = 6e4 if dtype == torch.float16 else 1e4
    student = (student.sign() * big + student).to(dtype)
    teacher = (teacher.sign() * big - teacher).to(dtype)
    fused, grad = terms_and_grad(
        "fused", student, teacher, labels, tau=2.0, loss_weight=1.0, ce_weight=1.0
    )
    assert torch.isfinite(fused.total) and torch.isfinite(grad).all()
    return compare(student, teacher, labels, tau=2.0)


def check_deterministic() -> dict:
    student, teacher, labels = make_batch(512, 21843, torch.bfloat16, seed=9)
    first = terms_and_grad("fused", student, teacher, labels, tau=2.0, loss_weight=2.5, ce_weight=1)
    second = terms_and_grad(
        "fused", student, teacher, labels, tau=2.0, loss_weight=2.5, ce_weight=1
    )
    assert torch.equal(first[0].total, second[0].total) and torch.equal(first[1], second[1])
    return {}


def check_no_host_sync() -> dict:
    if DEVICE.type != "cuda":
        return {"skipped": "CUDA only"}
    student, teacher, labels = make_batch(256, 1000, torch.float16, seed=10)
    student.requires_grad_(True)
    terms_and_grad("fused", student, teacher, labels, tau=2.0, loss_weight=2.5, ce_weight=1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = wsld_ce_loss(
            student, teacher, labels, tau=2.0, loss_weight=2.5, ce_weight=1.0, impl="fused"
        )
        (grad,) = torch.autograd.grad(terms.total, student)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {}


def check_teacher_no_grad() -> dict:
    student, teacher, labels = make_batch(8, 100, torch.float32, seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    wsld_ce_loss(
        student, teacher, labels, tau=2.0, loss_weight=1.0, ce_weight=1.0, impl="fused"
    ).total.backward()
    assert teacher.grad is None and student.grad is not None
    return {}


def check_float64_rejected() -> dict:
    if DEVICE.type != "cuda":
        return {"skipped": "CUDA only"}
    student, teacher, labels = make_batch(4, 10, torch.float64)
    try:
        torch.ops.fastkd.wsld(student, teacher, labels, 2.0, 1.0)
    except TypeError as error:
        assert "float64" in str(error)
        return {}
    raise AssertionError("float64 on CUDA should raise TypeError")


def check_large_offsets() -> dict:
    """Rows beyond element 2**31: 64-bit offsets in both kernels (checks the last rows)."""
    rows, classes = 100_000, 21_475  # 2.1475e9 elements > 2**31
    if DEVICE.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        needed = 3 * rows * classes * 2 + (1 << 30)
        if free < needed:
            return {"skipped": f"needs {needed / 2**30:.1f} GiB free, have {free / 2**30:.1f}"}
    else:  # the same logic at a size the CPU handles (this only tests the script)
        rows, classes = 3_000, 1_000
    gen = torch.Generator(device=DEVICE).manual_seed(12)
    student = torch.randn(rows, classes, device=DEVICE, dtype=torch.float16, generator=gen)
    teacher = torch.randn(rows, classes, device=DEVICE, dtype=torch.float16, generator=gen)
    labels = torch.randint(0, classes, (rows,), device=DEVICE, generator=gen)
    *_, stats = torch.ops.fastkd.wsld_ce(student, teacher, labels, 2.0, 1.0, 1.0)
    # An upstream gradient of N undoes the 1/N of the mean, keeping float16 gradients of a
    # 100k-row batch out of the subnormal range.
    upstream = torch.full((), float(rows), device=DEVICE)
    grad = torch.ops.fastkd.wsld_backward(upstream, student, teacher, labels, stats, 2.0, 1.0, 1.0)
    tail = slice(rows - 64, rows)
    s_tail, t_tail, y_tail = student[tail], teacher[tail], labels[tail]
    *_, tail_stats = torch.ops.fastkd.wsld_ce(s_tail.clone(), t_tail.clone(), y_tail, 2.0, 1.0, 1.0)
    torch.testing.assert_close(stats[tail], tail_stats, rtol=1e-5, atol=1e-6)
    _, ref_grad = terms_and_grad(
        "reference", s_tail, t_tail, y_tail, tau=2.0, loss_weight=1.0, ce_weight=1.0
    )
    # Full batch: N/N = 1 per row; the 64-row reference carries 1/64.
    expected = ref_grad.float() * 64
    torch.testing.assert_close(
        grad[tail].float(), expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max())
    )
    del student, teacher, grad
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return {"elements": rows * classes}


def copy_bandwidth_gb_per_s() -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / time, the roofline to compare to."""
    size = 1 << (26 if QUICK else 30)
    buffers = [torch.empty(size, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    ms = time_ms(lambda: buffers[1].copy_(buffers[0]), DEVICE, reps=20, rounds=5)
    buffers.clear()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * size / (ms * 1e-3) / 1e9


def performance(results: dict) -> None:
    device = DEVICE
    sizes = ((256, 1000), (64, 21843)) if QUICK else TIMING_SIZES
    copy_bw = copy_bandwidth_gb_per_s()
    results["copy_gb_per_s"] = copy_bw
    print(f"device-to-device copy: {copy_bw:.0f} GB/s", flush=True)
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n, c in sizes:
            row = bench_size(
                n,
                c,
                dtype,
                device,
                tau=2.0,
                loss_weight=2.5,
                ce_weight=1.0,
                reps=3 if QUICK else None,
                rounds=1 if QUICK else 5,
                inductor=dtype == torch.float16 and (n, c) in INDUCTOR_SIZES,
            )
            # GPU time from the graph replay where there is one (no launch gaps), else events.
            bandwidth = row.get("kernels_graph_gb_per_s", row.get("kernels_gb_per_s"))
            if bandwidth is not None:
                row["bandwidth_fraction_of_copy"] = bandwidth / copy_bw
            rows.append(row)
            print(format_table([row], list(row)).splitlines()[-1], flush=True)
    results["timing"] = rows
    columns = [
        "dtype",
        "N",
        "C",
        "eager_ms",
        "fused_ms",
        "speedup",
        "eager_ce_ms",
        "fused_ce_ms",
        "speedup_ce",
        "speedup_graph",
        "speedup_ce_graph",
        "speedup_vs_inductor_ce",
        "kernels_ms",
        "kernels_graph_ms",
        "kernels_gb_per_s",
        "bandwidth_fraction_of_copy",
    ]
    print(format_table(rows, columns), flush=True)

    def find(dtype: str, n: int, c: int) -> dict:
        match = [r for r in rows if r["dtype"] == dtype and r["N"] == n and r["C"] == c]
        return match[0] if match else {}

    goals = []
    small = find("float16", 256, 1000)
    # Both clocks: eager launches (CPU-bound at this size) and CUDA-graph replays (GPU time).
    for key, what in [
        ("speedup", "wsld, eager launches"),
        ("speedup_ce", "wsld + ce, eager launches"),
        ("speedup_graph", "wsld, CUDA graph (GPU time)"),
        ("speedup_ce_graph", "wsld + ce, CUDA graph (GPU time)"),
    ]:
        value = small.get(key)
        goals.append(
            {
                "goal": f"fused >= 10x eager at 256x1000 float16 ({what})",
                "value": value,
                "met": (value or 0) >= 10,
            }
        )
    for dtype in ("float16", "bfloat16", "float32"):
        big = find(dtype, 4096, 21843)
        fraction = big.get("bandwidth_fraction_of_copy")
        goals.append(
            {
                "goal": f">= 70% of copy bandwidth at 4096x21843 {dtype}",
                "value": fraction,
                "met": (fraction or 0) >= 0.7,
            }
        )
    results["goals"] = goals
    for goal in goals:
        print(f"[{'met' if goal['met'] else 'MISSED'}] {goal['goal']}: {goal['value']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to test this script")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    args = parser.parse_args(argv)
    global DEVICE, QUICK
    DEVICE, QUICK = torch.device(args.device), args.quick

    results: dict[str, object] = {
        "benchmark": "gpu_loss_check",
        "machine": machine_info(),
        "python": platform.python_version(),
    }
    ext = ops.extension
    results["extension"] = (
        None
        if ext is None
        else {
            "with_cuda": bool(ext.with_cuda),
            "cpu_capabilities": ext.cpu_capabilities,
            "cuda_kernels": ops.fused_available("cuda"),
        }
    )
    checks = Checks()
    status = 0
    results["device"] = DEVICE.type
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        results.update(status="skipped", reason="no CUDA device visible to torch")
        print("no CUDA device: nothing to check on the GPU (JSON still written)")
    elif not ops.fused_available(DEVICE):
        results.update(
            status="failed",
            reason=f"fastkd._C has no {DEVICE.type} kernels "
            "(build with FASTKD_BUILD_CUDA=1 and a CUDA toolkit)",
        )
        status = 1
    else:
        if DEVICE.type == "cuda":
            props = torch.cuda.get_device_properties(0)
            results["gpu"] = {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        correctness_checks(checks)
        results["checks"] = checks.records
        if not args.skip_timing:
            try:
                performance(results)
            except Exception:  # noqa: BLE001 - timing problems are reported, not fatal
                results["timing_error"] = traceback.format_exc()[-3000:]
                print(results["timing_error"])
        results["failed_checks"] = checks.failed
        results["status"] = "failed" if checks.failed else "passed"
        status = 1 if checks.failed else 0
        print(f"{len(checks.records) - len(checks.failed)}/{len(checks.records)} checks passed")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
