"""Images/sec of the training step with the distillation diagnostics on vs off, side by side.

``train.diagnostics`` adds a few N-element ops to each step (fastkd/diagnostics.py) and a
105-element sum to the meter. Both sides here run what the trainer's loop runs per step,
`fastkd.engine.train_step` then `TrainMeter.update` (with its log line, and so its one device
read, every ``--log-every`` steps), on one set of models and one fixed device-resident batch.
They alternate in blocks of ``--block`` steps for ``--rounds`` rounds, so a shared machine's drift
hits both alike. Reported: each side's images/sec over all its blocks, the ratio on/off, and the
spread of the per-round ratios (the noise the ratio is to be read against).

``--objective-only`` times the objective alone instead (forward and backward of the WSLD loss on
random ``--batch-size`` x ``--num-classes`` logits, eager): the diagnostics' own cost, which the
whole step hides (images/sec there means rows of logits per second).

    python benchmarks/bench_diagnostics.py --image-size 64 --batch-size 32 --json out.json   # CPU
    python benchmarks/bench_diagnostics.py --image-size 224 --batch-size 256 --json out.json # GPU
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import COMPILE_MODES, DEFAULT, fixed_batch, make_config, parse_variant  # noqa: E402
from common import format_table, run_cli, write_json  # noqa: E402

from fastkd.builders import build_models, build_train_state, seed_everything  # noqa: E402
from fastkd.distributed import DistInfo, resolve_device  # noqa: E402
from fastkd.engine import TrainState, build_objective, resolve_precision, train_step  # noqa: E402
from fastkd.logging import MetricsWriter  # noqa: E402
from fastkd.meter import sync  # noqa: E402

SIDES = ("on", "off")


def build_states(args: argparse.Namespace, device: torch.device) -> dict[str, TrainState]:
    """One train state per side (diagnostics on / off) over the same models."""
    states: dict[str, TrainState] = {}
    models = None
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    for side in SIDES:
        cfg = make_config(args, args.variant)
        cfg.train.diagnostics = side == "on"
        cfg.train.log_every = args.log_every
        precision = resolve_precision(cfg.train.amp, device)
        models = models or build_models(cfg, args.num_classes, dist)
        with tempfile.TemporaryDirectory() as tmp:
            state = build_train_state(
                cfg, models, dist=dist, precision=precision, steps_per_epoch=10**6,
                metrics=MetricsWriter(tmp, enabled=False),
            )  # fmt: skip
        state.meter.start_epoch(1, 1, 10**6)
        states[side] = state
    return states


def run_block(state: TrainState, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` steps of the loop's per-step work, device work included."""
    sync(state.device)
    start = time.perf_counter()
    for _ in range(steps):
        terms, logits = train_step(state, images, labels)
        state.global_step += 1
        state.meter.update(terms, logits, labels, global_step=state.global_step)
    sync(state.device)
    return time.perf_counter() - start


def alternate(blocks: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Seconds of each side's block, ``rounds`` times, the side that goes first alternating."""
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_ in range(rounds):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            seconds[side].append(blocks[side]())
    return seconds


def summarize(args: argparse.Namespace, seconds: dict[str, list[float]], **row: Any) -> dict:
    images_per_side = args.rounds * args.block * args.batch_size
    rates = {side: images_per_side / sum(seconds[side]) for side in SIDES}
    per_round = [off / on for on, off in zip(seconds["on"], seconds["off"], strict=True)]
    return {
        **row,
        "on_img_per_s": rates["on"],
        "off_img_per_s": rates["off"],
        "ratio_on_off": rates["on"] / rates["off"],
        "round_ratio_median": statistics.median(per_round),
        "round_ratio_min": min(per_round),
        "round_ratio_max": max(per_round),
        "round_ratios": per_round,
    }


def measure_objective(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The WSLD objective's forward + backward alone, diagnostics on vs off."""
    loss = make_config(args, args.variant).loss
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.num_classes)
    student = torch.randn(shape, generator=generator).to(device).requires_grad_()
    teacher = torch.randn(shape, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    objectives = {side: build_objective(loss, diagnostics_on=side == "on") for side in SIDES}

    def block(side: str, steps: int) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            total, _ = objectives[side](student, teacher, labels)
            total.backward()
        sync(device)
        return time.perf_counter() - start

    for side in SIDES:
        block(side, 10)
    blocks = {side: functools.partial(block, side, args.block) for side in SIDES}
    row = {
        "variant": f"objective {args.batch_size}x{args.num_classes} (eager)",
        "precision": "fp32",
    }
    return summarize(args, alternate(blocks, args.rounds), **row)


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    states = build_states(args, device)
    cfg = make_config(args, args.variant)
    precision = resolve_precision(cfg.train.amp, device)
    images, labels = fixed_batch(args, cfg, device, precision, args.num_classes)
    for side in SIDES:  # compile, the meter's warm-up step, then a few untimed steps
        run_block(states[side], images, labels, 1 + args.warmup)
    blocks = {
        side: functools.partial(run_block, states[side], images, labels, args.block)
        for side in SIDES
    }
    seconds = alternate(blocks, args.rounds)
    return summarize(args, seconds, variant=args.variant, precision=precision.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--loss", default="wsld", choices=["wsld", "kd"])
    parser.add_argument("--loss-impl", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--variant", default=DEFAULT, help=f"as in bench_train (default {DEFAULT})")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=6, help="on/off block pairs")
    parser.add_argument("--block", type=int, default=10, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--log-every", type=int, default=50, help="train.log_every (default's)")
    parser.add_argument("--objective-only", action="store_true", help="time the objective alone")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        parse_variant(args.variant)
    except ValueError as error:
        parser.error(str(error))
    for name in ("rounds", "block", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    warnings.filterwarnings("ignore", message=".*uses random weights.*")
    logging.getLogger("fastkd").setLevel(logging.WARNING)  # no progress lines in the timing
    device = resolve_device(args.device)
    seed_everything(0, deterministic=False)
    row = (measure_objective if args.objective_only else measure)(args, device)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config["device"] = str(device)
    write_json(args.json, "bench_diagnostics", config, [row])
    print(
        f"{args.teacher} -> {args.student} ({args.loss}), {args.image_size}px, batch "
        f"{args.batch_size}, {device}, {args.variant}, {args.rounds} x {args.block} steps a side"
    )
    columns = ["variant", "precision", "on_img_per_s", "off_img_per_s", "ratio_on_off",
               "round_ratio_median", "round_ratio_min", "round_ratio_max"]  # fmt: skip
    print(format_table([row], columns))
    return 0


if __name__ == "__main__":
    run_cli(main)
