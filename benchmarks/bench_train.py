"""Images/sec of the whole distillation step, variant by variant, measured side by side.

The step is fastkd's own (`fastkd.engine.train_step`, built by the trainer's own builders): teacher
forward, student forward and backward, WSLD loss, optimizer step. Batches are device-resident (one
fixed batch, re-used) so the numbers measure compute, not data loading; ``--root`` adds an
end-to-end row that feeds the same step from the real loader.

Variants: {eager, compiled} x {fp32, AMP} x {NCHW, channels_last}, named like ``compiled/amp/cl``;
``compiled:MODE/...`` picks a torch.compile mode for that variant alone (``reduce-overhead``,
``max-autotune``, ``max-autotune-no-cudagraphs``; plain ``compiled`` uses ``--compile-mode``), so
one run can compare modes. The ratio column compares each with eager/fp32/NCHW, measured in the
same run. A variant that fails is recorded with its error and the run goes on; the JSON is
rewritten after every variant, so a run cut short by a time limit keeps what it measured. FLOPs per image come from
``torch.utils.flop_counter``; on a GPU, model FLOP utilization (MFU) is reported against the measured
peak of a large matmul in the AMP dtype the GPU has natively (bf16 from sm_80, fp16 on a V100).

    python benchmarks/bench_train.py --image-size 112 --batch-size 32 --json out.json       # CPU
    python benchmarks/bench_train.py --image-size 224 --batch-size 256 --json out.json      # GPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import sys
import tempfile
import time
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import format_table, run_cli, write_json  # noqa: E402

from fastkd.builders import batch_dtype, build_models, build_train_state, seed_everything  # noqa: E402
from fastkd.config import TrainConfig, from_dict  # noqa: E402
from fastkd.data import build_train_loader  # noqa: E402
from fastkd.data.folder import scan_split  # noqa: E402
from fastkd.distributed import DistInfo, resolve_device  # noqa: E402
from fastkd.engine import count_step_flops, measure_peak_flops, resolve_precision, train_step  # noqa: E402
from fastkd.logging import MetricsWriter  # noqa: E402
from fastkd.meter import sync  # noqa: E402
from fastkd.models import memory_format  # noqa: E402
from fastkd.profiling import StepProfiler  # noqa: E402

ALL_VARIANTS = [
    f"{c}/{a}/{m}"
    for c, a, m in itertools.product(("eager", "compiled"), ("fp32", "amp"), ("nchw", "cl"))
]
BASELINE = "eager/fp32/nchw"
DEFAULT = "compiled/amp/cl"  # the trainer's default configuration
COMPILE_MODES = typing.get_args(typing.get_type_hints(TrainConfig)["compile_mode"])


class Variant(NamedTuple):
    compiled: bool
    compile_mode: str | None  # None: --compile-mode
    amp: bool
    channels_last: bool


def parse_variant(name: str) -> Variant:
    """``{eager|compiled[:MODE]}/{fp32|amp}/{nchw|cl}`` -> Variant; ValueError naming the part."""
    parts = name.split("/")
    if len(parts) != 3:
        raise ValueError(
            f"variant {name!r} must look like compiled/amp/cl: "
            "{eager|compiled[:MODE]}/{fp32|amp}/{nchw|cl}"
        )
    how, amp, layout = parts
    kind, _, mode = how.partition(":")
    if kind not in ("eager", "compiled") or (kind == "eager" and mode):
        raise ValueError(f"variant {name!r}: {how!r} must be eager, compiled or compiled:MODE")
    if mode and mode not in COMPILE_MODES:
        raise ValueError(f"variant {name!r}: compile mode {mode!r} is not one of {COMPILE_MODES}")
    if amp not in ("fp32", "amp"):
        raise ValueError(f"variant {name!r}: precision {amp!r} must be fp32 or amp")
    if layout not in ("nchw", "cl"):
        raise ValueError(f"variant {name!r}: layout {layout!r} must be nchw or cl")
    return Variant(kind == "compiled", mode or None, amp == "amp", layout == "cl")


def make_config(args: argparse.Namespace, variant: str, root: str = "/unused") -> Any:
    spec = parse_variant(variant)
    return from_dict(
        {
            "data": {
                "root": root,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "workers": args.workers,
            },
            "teacher": {"arch": args.teacher, "weights": "random"},
            "student": {"arch": args.student},
            "loss": {"kind": args.loss, "impl": args.loss_impl},
            "train": {
                "device": args.device,
                "compile": spec.compiled,
                "compile_mode": spec.compile_mode or args.compile_mode,
                "amp": "auto" if spec.amp else "off",
                "channels_last": spec.channels_last,
            },
        }
    )


def fixed_batch(
    args: argparse.Namespace, cfg: Any, device: torch.device, precision: Any, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded random batch on ``device``, in the dtype and memory format the variant's
    loader would hand over: the device-resident batch every timed step re-uses."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    images = images.to(
        device=device,
        dtype=batch_dtype(cfg, device, precision),
        memory_format=memory_format(cfg.train.channels_last),
    )
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=generator).to(device)
    return images, labels


def bench_variant(
    args: argparse.Namespace, variant: str, device: torch.device, num_classes: int
) -> dict[str, Any]:
    """Build the variant's models and step, compile/warm up, then time ``args.steps`` steps."""
    cfg = make_config(args, variant)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    precision = resolve_precision(cfg.train.amp, device)
    models = build_models(cfg, num_classes, dist)
    with tempfile.TemporaryDirectory() as tmp:
        state = build_train_state(
            cfg,
            models,
            dist=dist,
            precision=precision,
            steps_per_epoch=10_000,
            metrics=MetricsWriter(tmp, enabled=False),
        )
    images, labels = fixed_batch(args, cfg, device, precision, num_classes)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_step(state, images, labels)
    sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup):
        train_step(state, images, labels)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        terms, _ = train_step(state, images, labels)
    sync(device)
    elapsed = time.perf_counter() - start
    loss = float(terms["loss"])
    row = {
        "variant": variant,
        "img_per_s": args.steps * args.batch_size / elapsed,
        "step_ms": 1000 * elapsed / args.steps,
        "first_step_s": first_step_s,
        "precision": precision.name,
        "loss": loss,
    }
    if device.type == "cuda":  # peak over compile, warm-up and the timed steps
        row["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile and variant in args.profile_variants:
        # After the timed steps, so the profiler's overhead never touches the img/s above.
        out_dir = Path(args.profile) / variant.replace("/", "_").replace(":", "-")
        profiler = StepProfiler(out_dir, skip=1, steps=args.profile_steps, device=device, rank=0)
        state.profiler = profiler  # the step marks its phases while a profiler is attached
        while profiler.active:
            train_step(state, images, labels)
            profiler.step()
        sync(device)
        state.profiler = None
        row["profile"] = profiler.result
    del state, models, images, labels, terms
    _release(device)
    return row


def _release(device: torch.device) -> None:
    """Forget compiled graphs and free memory between variants (also after a failed one)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_end_to_end(
    args: argparse.Namespace, variant: str, device: torch.device
) -> dict[str, Any]:
    """``variant`` fed by the real loader (``--root``): img/s and the data-wait fraction.

    The loader hands over batches in the variant's memory format (contiguous NCHW for ``nchw``),
    as the trainer's loader does with ``train.channels_last``.
    """
    cfg = make_config(args, variant, root=args.root)
    cfg.data.backend = args.backend
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    precision = resolve_precision(cfg.train.amp, device)
    loader = build_train_loader(
        cfg.data,
        device=device,
        seed=0,
        dtype=batch_dtype(cfg, device, precision),
        channels_last=cfg.train.channels_last,
    )
    models = build_models(cfg, loader.num_classes, dist)
    with tempfile.TemporaryDirectory() as tmp:
        state = build_train_state(
            cfg,
            models,
            dist=dist,
            precision=precision,
            steps_per_epoch=len(loader),
            metrics=MetricsWriter(tmp, enabled=False),
        )
    images_done, wait_s, timed_s, first_step_s = 0, 0.0, 0.0, None
    try:
        for epoch in range(args.e2e_epochs):
            loader.set_epoch(epoch)
            iterator = iter(loader)
            while True:
                step_start = time.perf_counter()
                try:
                    images, labels = next(iterator)
                except StopIteration:
                    break
                got_batch = time.perf_counter()
                train_step(state, images, labels)
                if first_step_s is None:  # compile + warm-up, excluded
                    sync(device)
                    first_step_s = time.perf_counter() - step_start
                    continue
                wait_s += got_batch - step_start
                images_done += labels.shape[0]
                timed_s += time.perf_counter() - step_start
        sync(device)
    finally:
        loader.close()
    return {
        "variant": f"{variant} + {loader.backend} loader",
        "img_per_s": images_done / max(1e-9, timed_s),
        "step_ms": 1000 * timed_s / max(1, images_done // args.batch_size),
        "first_step_s": first_step_s,
        "data_wait_frac": wait_s / max(1e-9, timed_s),
        "precision": precision.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--loss", default="wsld", choices=["wsld", "kd", "ce"])
    parser.add_argument("--loss-impl", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps after the first (compile) step"
    )
    parser.add_argument(
        "--variants",
        default="all",
        help=f"comma-separated subset of {', '.join(ALL_VARIANTS)}; compiled:MODE/... sets the "
        "compile mode of one variant",
    )
    parser.add_argument(
        "--compile-mode", default="default", choices=COMPILE_MODES, help="for plain 'compiled'"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--root",
        default=None,
        help="ImageFolder root: adds the end-to-end row with the real loader",
    )
    parser.add_argument("--backend", default="dali", choices=["dali", "torch"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--e2e-epochs", type=int, default=1)
    parser.add_argument(
        "--e2e-variants",
        default=DEFAULT,
        help=f"comma-separated variants fed by the real loader with --root (default {DEFAULT})",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, profile --profile-steps more steps of --profile-variants with "
        "torch.profiler: trace and operator tables under DIR/<variant>/, top kernels in the JSON",
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument(
        "--profile-variants",
        default=DEFAULT,
        help=f"comma-separated variants to profile (default {DEFAULT})",
    )
    args = parser.parse_args(argv)
    args.profile_variants = [v.strip() for v in args.profile_variants.split(",")]
    if args.profile_steps < 1:
        parser.error(f"--profile-steps must be >= 1, got {args.profile_steps}")

    warnings.filterwarnings("ignore", message=".*uses random weights.*")
    logging.getLogger("fastkd").setLevel(logging.WARNING)
    device = resolve_device(args.device)
    seed_everything(0, deterministic=False)  # the trainer's kernel choices (cuDNN autotuning, TF32)
    variants = (
        ALL_VARIANTS if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    )
    args.e2e_variants = [v.strip() for v in args.e2e_variants.split(",")]
    for variant in variants + args.e2e_variants:
        try:
            parse_variant(variant)
        except ValueError as error:
            parser.error(str(error))
    if BASELINE not in variants:
        variants.insert(0, BASELINE)
    else:  # the baseline first: every later row's ratio is known as soon as it is measured
        variants.insert(0, variants.pop(variants.index(BASELINE)))

    if args.root:  # a bad --root is found now, not after minutes of benchmarking
        scan_split(args.root, "train")

    probe = make_config(args, BASELINE)
    probe_models = build_models(probe, args.num_classes, DistInfo(0, 1, 0, device))
    flops_per_image = count_step_flops(
        probe_models.student, probe_models.teacher, args.image_size, device
    )
    del probe_models
    # MFU's denominator: the peak of the AMP dtype this GPU really has (fp16 on a V100).
    amp = resolve_precision("auto", device)
    peak_flops = measure_peak_flops(device, amp.dtype)
    print(
        f"{args.teacher} -> {args.student}, {args.image_size}px, batch {args.batch_size}, {device}: "
        f"{flops_per_image / 1e9:.2f} GFLOP per image per step"
        + (f"; {amp.name} matmul peak {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else ""),
        flush=True,
    )
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config.update(device=str(device), flops_per_image=flops_per_image, peak_flops=peak_flops)

    results: list[dict[str, Any]] = []
    for variant in variants:
        try:
            row = bench_variant(args, variant, device, args.num_classes)
        except Exception as error:  # noqa: BLE001 - record it, measure the other variants
            if variant == BASELINE:
                raise  # no ratio means anything without it
            row = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"  {variant:<18} FAILED: {row['error'][:300]}", flush=True)
            traceback.print_exc()
            _release(device)
        else:
            print(
                f"  {variant:<18} {row['img_per_s']:9.1f} img/s  "
                f"(first step {row['first_step_s']:.1f}s)",
                flush=True,
            )
        results.append(row)
        add_ratios(results, flops_per_image, peak_flops)
        write_json(args.json, "bench_train", config, results)
    for variant in args.e2e_variants if args.root else []:
        results.append(bench_end_to_end(args, variant, device))
        _release(device)
        add_ratios(results, flops_per_image, peak_flops)
        write_json(args.json, "bench_train", config, results)
    columns = [
        "variant",
        "precision",
        "img_per_s",
        "vs_baseline",
        "step_ms",
        "first_step_s",
        "tflops",
    ]
    if peak_flops:
        columns.append("mfu")
    if device.type == "cuda":
        columns.append("max_mem_gib")
    if args.root:
        columns.append("data_wait_frac")
    print(format_table(results, columns))
    for row in results:
        if "error" in row:
            print(f"{row['variant']} failed: {row['error'][:300]}")
        if row.get("profile"):
            profile = row["profile"]
            print(
                f"\n{row['variant']}: top operators over {profile['steps']} profiled steps "
                f"(full tables and trace in {profile['dir']})"
            )
            print(
                format_table(
                    profile["phases"], list(profile["phases"][0]) if profile["phases"] else []
                )
            )
            time_key = "self_device_us" if device.type == "cuda" else "self_cpu_us"
            print(
                format_table(
                    [
                        {
                            "name": op["name"][:70],
                            "calls": op["calls"],
                            "share": op["share"],
                            "ms_per_step": op["self_us_per_step"] / 1e3,
                            time_key: op[time_key],
                        }
                        for op in profile["top_ops"]
                    ],
                    ["name", "calls", "share", "ms_per_step", time_key],
                )
            )
    return 1 if any("error" in row for row in results) else 0


def add_ratios(
    results: list[dict[str, Any]], flops_per_image: float, peak_flops: float | None
) -> None:
    """vs_baseline, TFLOP/s and MFU of every measured row (the baseline is always the first)."""
    baseline = results[0]["img_per_s"]
    for row in results:
        if "img_per_s" not in row:
            continue
        row["vs_baseline"] = row["img_per_s"] / baseline
        row["tflops"] = row["img_per_s"] * flops_per_image / 1e12
        if peak_flops:
            row["mfu"] = row["img_per_s"] * flops_per_image / peak_flops


if __name__ == "__main__":
    run_cli(main)
