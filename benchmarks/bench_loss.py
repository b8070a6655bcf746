"""Forward+backward time of the fused WSLD op against the eager formulation.

The eager baseline is mmrazor's ``WSLD.forward`` op sequence (softmax, log_softmax x3, one_hot,
products, sums, max, exp, mean) in the logits' dtype, as a trainer using mmrazor runs it; the
"+ce" rows add the student's hard-label ``F.cross_entropy``, which the trainer needs too and which
``wsld_ce_loss`` fuses into the same op. Each row times ``loss = f(s, t, y)`` plus
``torch.autograd.grad(loss, s)``; "kernels" times the fused ops called directly, without
autograd, and is what the memory-bandwidth column (bytes that must move: read s and t twice,
write the gradient once) is computed from. On CUDA the same variants are also timed as CUDA graph
replays ("*_graph" columns): the GPU's own time, without the CPU launch overhead that dominates
small eager steps.

    python benchmarks/bench_loss.py                       # CPU (and CUDA when present)
    python benchmarks/bench_loss.py --device cuda --dtypes float16,bfloat16 --json out.json

On CUDA the times come from CUDA events around a loop of launches (so CPU launch overhead shows
when it dominates, as it does in training) after a warm-up; on the CPU from perf_counter. Each
time is the median of ``--rounds`` rounds, run interleaved across the variants, and each
speedup the median of the per-round ratios (robust to a busy shared machine).

``--cpu-kernels default,avx2`` also times the fused op with "+ce" once per CPU kernel build
(pinned with FASTKD_CPU_CAPABILITY, interleaved per round) and reports each build's speedup over
the first, with the spread of the per-round ratios:

    python benchmarks/bench_loss.py --device cpu --dtypes float32,bfloat16 --cpu-kernels default,avx2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, run_cli, write_json  # noqa: E402

from fastkd.losses import fused_available, wsld_ce_loss, wsld_loss  # noqa: E402

DEFAULT_SIZES = ((256, 1000), (1024, 1000), (128, 21843))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def mmrazor_wsld(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    loss_weight: float,
    zero: torch.Tensor,
) -> torch.Tensor:
    """mmrazor's WSLD.forward op for op. ``zero`` is its ``torch.zeros(1)``, made once on the
    device up front (mmrazor makes it on the host and copies it every call, which would only
    flatter the fused op)."""
    num_classes = student.shape[1]
    student_logits = student / tau
    teacher_logits = teacher / tau
    teacher_probs = F.softmax(teacher_logits, dim=1)
    ce_loss = -torch.sum(teacher_probs * F.log_softmax(student_logits, dim=1), 1, keepdim=True)
    log_softmax_s = F.log_softmax(student.detach(), dim=1)
    log_softmax_t = F.log_softmax(teacher.detach(), dim=1)
    one_hot_labels = F.one_hot(labels, num_classes=num_classes).float()
    ce_loss_s = -torch.sum(one_hot_labels * log_softmax_s, 1, keepdim=True)
    ce_loss_t = -torch.sum(one_hot_labels * log_softmax_t, 1, keepdim=True)
    focal_weight = ce_loss_s / (ce_loss_t + 1e-7)
    focal_weight = torch.max(focal_weight, zero)
    focal_weight = 1 - torch.exp(-focal_weight)
    ce_loss = focal_weight * ce_loss
    return loss_weight * (tau**2) * torch.mean(ce_loss)


def _round_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Mean time of ``reps`` back-to-back calls of ``fn``, in milliseconds."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - begin) * 1e3 / reps


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``reps`` calls of ``fn``, in milliseconds."""
    return time_variants({"fn": fn}, device, reps, rounds)["fn"][0]


def time_variants(
    variants: dict[str, Callable[[], object]], device: torch.device, reps: int, rounds: int
) -> dict[str, list[float]]:
    """Per-round times (ms) of each variant, median first, then the rounds in order.

    Rounds are interleaved (every variant once per round) so that a noisy neighbour on a shared
    machine slows all variants of a round alike and per-round ratios stay meaningful.
    """
    for fn in variants.values():  # warm-up: allocator, caches, lazy initialization
        for _ in range(max(3, reps // 5)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_round_ms(fn, device, reps))
    return {name: [statistics.median(times), *times] for name, times in samples.items()}


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-round ratios (the rounds after the leading median)."""
    return statistics.median(a / b for a, b in zip(numerator[1:], denominator[1:], strict=True))


def compare_cpu_kernels(
    fn: Callable[[], object], kernels: list[str], reps: int, rounds: int
) -> dict[str, float]:
    """``fn`` timed once per CPU kernel build, interleaved, and each build's speedup over the
    first (median, min and max of the per-round ratios). The build is pinned per call through
    FASTKD_CPU_CAPABILITY, which the op reads on every call; the variable is restored after."""
    previous = os.environ.get("FASTKD_CPU_CAPABILITY")

    def pinned(kernel: str) -> Callable[[], object]:
        def run() -> object:
            os.environ["FASTKD_CPU_CAPABILITY"] = kernel
            return fn()

        return run

    try:
        samples = time_variants({k: pinned(k) for k in kernels}, torch.device("cpu"), reps, rounds)
    finally:
        if previous is None:
            os.environ.pop("FASTKD_CPU_CAPABILITY", None)
        else:
            os.environ["FASTKD_CPU_CAPABILITY"] = previous
    row = {f"fused_ce_{kernel}_ms": samples[kernel][0] for kernel in kernels}
    base = samples[kernels[0]][1:]
    for kernel in kernels[1:]:
        ratios = [a / b for a, b in zip(base, samples[kernel][1:], strict=True)]
        row[f"speedup_{kernel}"] = statistics.median(ratios)
        row[f"speedup_{kernel}_min"] = min(ratios)
        row[f"speedup_{kernel}_max"] = max(ratios)
    return row


def capture_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` (forward + backward included) captured once as a CUDA graph; returns its replay.

    Replaying measures the GPU's own time for the work, without the CPU's per-op launch cost:
    the eager formulation launches ~35 small kernels per step, the fused one 3.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graph requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


_GRAPHS_BROKEN: list[str] = []  # a failed capture disables further ones (see bench_size)


def auto_reps(rows: int, classes: int, device: torch.device) -> int:
    """Enough repetitions for ~0.1-0.3 s per round without making big sizes take minutes."""
    elements = rows * classes
    if device.type == "cuda":
        return max(20, min(500, int(2e9 / max(elements, 1) / 10)))
    return max(3, min(200, int(3e7 / max(elements, 1))))


def bench_size(
    rows: int,
    classes: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    tau: float,
    loss_weight: float,
    ce_weight: float,
    reps: int | None,
    rounds: int,
    graphs: bool = True,
    inductor: bool = False,
    cpu_kernels: list[str] | None = None,
) -> dict[str, object]:
    """One table row: eager, reference and fused times (and bandwidth) for one shape/dtype.

    On CUDA with ``graphs``, the eager, fused and kernel-only variants are also timed as CUDA
    graph replays (``*_graph_ms``, ``speedup_graph``): GPU time without launch overhead.
    With ``inductor``, the eager objective (CE + mmrazor's WSLD) is also timed compiled by
    ``torch.compile`` (``inductor_ce_ms``, ``speedup_vs_inductor_ce``): what a user gets without
    the custom op. It compiles once per shape and dtype (seconds on a CPU, more on a GPU).
    With ``cpu_kernels`` (CPU only), the fused "+ce" variant is also timed once per CPU kernel
    build (``compare_cpu_kernels``).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    student = (torch.randn(rows, classes, generator=gen) * 3).to(device, dtype)
    teacher = (torch.randn(rows, classes, generator=gen) * 3).to(device, dtype)
    labels = torch.randint(0, classes, (rows,), generator=gen).to(device)
    student.requires_grad_(True)
    zero = torch.zeros(1, device=device)
    reps = reps or auto_reps(rows, classes, device)

    def grad_of(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(loss_fn(), student)

    def eager_objective(s, t, y):  # what a trainer using mmrazor computes: CE + WSLD
        return ce_weight * F.cross_entropy(s, y) + mmrazor_wsld(s, t, y, tau, loss_weight, zero)

    def terms_total(impl: str) -> torch.Tensor:
        terms = wsld_ce_loss(
            student,
            teacher,
            labels,
            tau=tau,
            loss_weight=loss_weight,
            ce_weight=ce_weight,
            impl=impl,
        )
        return terms.total

    variants: dict[str, Callable[[], object]] = {
        "eager": grad_of(lambda: mmrazor_wsld(student, teacher, labels, tau, loss_weight, zero)),
        "eager_ce": grad_of(lambda: eager_objective(student, teacher, labels)),
        "reference_ce": grad_of(lambda: terms_total("reference")),
    }
    if inductor:
        compiled_objective = torch.compile(eager_objective, dynamic=False)
        variants["inductor_ce"] = grad_of(lambda: compiled_objective(student, teacher, labels))
    fused = fused_available(device)
    if fused:
        variants["fused"] = grad_of(
            lambda: wsld_loss(student, teacher, labels, tau, loss_weight, impl="fused")
        )
        variants["fused_ce"] = grad_of(lambda: terms_total("fused"))
        detached = student.detach()

        def kernels() -> object:
            *_, row_stats = torch.ops.fastkd.wsld_ce(
                detached, teacher, labels, tau, loss_weight, ce_weight
            )
            return torch.ops.fastkd.wsld_backward(
                grad_one, detached, teacher, labels, row_stats, tau, loss_weight, ce_weight
            )

        grad_one = torch.ones((), device=device)
        variants["kernels"] = kernels

    samples = time_variants(variants, device, reps, rounds)
    times = {name: values[0] for name, values in samples.items()}
    row: dict[str, object] = {
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "N": rows,
        "C": classes,
        "reps": reps,
        **{f"{name}_ms": value for name, value in times.items()},
    }
    if fused:
        row["speedup"] = median_ratio(samples["eager"], samples["fused"])
        row["speedup_ce"] = median_ratio(samples["eager_ce"], samples["fused_ce"])
        if inductor:
            row["speedup_vs_inductor_ce"] = median_ratio(
                samples["inductor_ce"], samples["fused_ce"]
            )
        # Bytes that must move: forward reads s and t, backward reads them again and writes grad.
        moved = 5 * rows * classes * student.element_size()
        row["kernels_gb_per_s"] = moved / (times["kernels"] * 1e-3) / 1e9
        if cpu_kernels and device.type == "cpu":
            row.update(compare_cpu_kernels(variants["fused_ce"], cpu_kernels, reps, rounds))
    if fused and graphs and device.type == "cuda" and not _GRAPHS_BROKEN:
        names = ("eager", "eager_ce", "fused", "fused_ce", "kernels")
        try:
            replays = {name: capture_graph(variants[name], device) for name in names}
            graph_samples = time_variants(replays, device, reps, rounds)
        except Exception as error:  # noqa: BLE001 - report and carry on without graphs
            # A failed capture can leave the stream unusable for later captures: stop trying.
            _GRAPHS_BROKEN.append(f"{type(error).__name__}: {error}")
            row["graph_error"] = _GRAPHS_BROKEN[0][:500]
        else:
            for name in names:
                row[f"{name}_graph_ms"] = graph_samples[name][0]
            row["speedup_graph"] = median_ratio(graph_samples["eager"], graph_samples["fused"])
            row["speedup_ce_graph"] = median_ratio(
                graph_samples["eager_ce"], graph_samples["fused_ce"]
            )
            row["kernels_graph_gb_per_s"] = moved / (graph_samples["kernels"][0] * 1e-3) / 1e9
        finally:
            replays = None
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return row


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        rows, classes = item.lower().split("x")
        sizes.append((int(rows), int(classes)))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="all", help="cpu, cuda or all (all present)")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma list; default float32 on CPU, float32,float16,bfloat16 on CUDA",
    )
    parser.add_argument("--sizes", default=",".join(f"{n}x{c}" for n, c in DEFAULT_SIZES))
    parser.add_argument("--tau", type=float, default=2.0, help="ImageNet recipe: 2")
    parser.add_argument("--loss-weight", type=float, default=2.5, help="ImageNet recipe: 2.5")
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=None, help="calls per round (default: auto)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument(
        "--inductor",
        action="store_true",
        help="also time the eager objective compiled by torch.compile (one compile per row)",
    )
    parser.add_argument(
        "--cpu-kernels",
        default=None,
        help="comma list of CPU kernel builds (default,avx2) to time the fused op with, on the CPU",
    )
    args = parser.parse_args(argv)
    cpu_kernels = args.cpu_kernels.split(",") if args.cpu_kernels else None
    if cpu_kernels:
        from fastkd.losses import ops

        built = ops.extension.cpu_capabilities.split(",") if ops.extension else []
        missing = [kernel for kernel in cpu_kernels if kernel not in built]
        if missing:
            parser.error(f"--cpu-kernels: no {', '.join(missing)} CPU kernel here (built: {built})")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "all":
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(args.device)]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")

    results = []
    for device in devices:
        if not fused_available(device):
            print(
                f"note: no fused kernel for {device.type} (fastkd._C not built for it); "
                "timing the eager and reference paths only"
            )
        default_dtypes = "float32" if device.type == "cpu" else "float32,float16,bfloat16"
        for dtype_name in (args.dtypes or default_dtypes).split(","):
            for rows, classes in parse_sizes(args.sizes):
                row = bench_size(
                    rows,
                    classes,
                    DTYPES[dtype_name],
                    device,
                    tau=args.tau,
                    loss_weight=args.loss_weight,
                    ce_weight=args.ce_weight,
                    reps=args.reps,
                    rounds=args.rounds,
                    inductor=args.inductor,
                    cpu_kernels=cpu_kernels,
                )
                results.append(row)
                print(format_table([row], list(row)).splitlines()[-1], flush=True)

    columns = [
        "device",
        "dtype",
        "N",
        "C",
        "eager_ms",
        "fused_ms",
        "speedup",
        "eager_ce_ms",
        "fused_ce_ms",
        "speedup_ce",
        "reference_ce_ms",
        "inductor_ce_ms",
        "speedup_vs_inductor_ce",
        "kernels_ms",
        "kernels_gb_per_s",
        "speedup_graph",
        "kernels_graph_gb_per_s",
    ]
    for kernel in cpu_kernels or []:
        columns.append(f"fused_ce_{kernel}_ms")
    for kernel in (cpu_kernels or [])[1:]:
        columns += [f"speedup_{kernel}", f"speedup_{kernel}_min", f"speedup_{kernel}_max"]
    print()
    print(format_table(results, columns))
    config = {k: v for k, v in vars(args).items() if k != "json"}
    write_json(args.json, "bench_loss", config, results)
    return 0


if __name__ == "__main__":
    run_cli(main)
