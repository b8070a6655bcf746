"""The fused WSLD op's speed on a GPU: timing against eager, memory bandwidth, and the goals.

    python benchmarks/gpu_loss_check.py --json results/loss_check.json

1. Timing against mmrazor's eager op sequence at 256x1000, 1024x1000, 128x21843 and 4096x21843
   (benchmarks/bench_loss.py), and achieved memory bandwidth against a measured
   device-to-device copy.
2. The goals: >= 10x faster than eager at 256x1000 float16; >= 70% of copy bandwidth at
   4096x21843.

Whether the op is correct is the tests' job: tests/test_losses.py and tests/test_ops.py run on
CUDA where marked ``gpu`` (benchmarks/gpu_check.sh runs them before this script). Without a GPU
this writes a JSON that says so and exits 0, so that gpu_check.sh runs anywhere;
``--device cpu --quick`` times the CPU kernels to test this script itself. A missed goal is
reported, not an error: the exit status is 1 only when the fused kernels are missing or the
timing itself failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import bench_size, time_ms  # noqa: E402
from common import format_table, machine_info  # noqa: E402

from fastkd.losses import ops  # noqa: E402

TIMING_SIZES = ((256, 1000), (1024, 1000), (128, 21843), (4096, 21843))
# Rows (float16) also timed against torch.compile of the eager objective: a compile each.
INDUCTOR_SIZES = ((256, 1000), (4096, 21843))
DEVICE = torch.device("cuda")  # --device cpu tests the script's logic on the CPU kernels
QUICK = False  # --quick: fewer and smaller cases


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
    rows: list[dict] = []
    results["timing"] = rows  # filled as measured: a failure later keeps the rows before it
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
    status = 0
    results["device"] = DEVICE.type
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        results.update(status="skipped", reason="no CUDA device visible to torch")
        print("no CUDA device: nothing to time on the GPU (JSON still written)")
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
        try:
            performance(results)
            results["status"] = "measured"
        except Exception:  # noqa: BLE001 - the rows measured so far are still written
            results.update(status="failed", timing_error=traceback.format_exc()[-3000:])
            print(results["timing_error"])
            status = 1

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
