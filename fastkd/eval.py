"""``python -m fastkd.eval --config X.yaml [key=value ...] --checkpoint P [--json OUT]``.

Evaluates a checkpoint (a ``student.pt`` state dict, or a fastkd ``last.pt`` / ``best.pt``) of
``student.arch`` on ``data.root``'s validation split, counting every image exactly once (also
under torchrun), and prints / writes ``top1``, ``top5`` (fractions) and ``num_images``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastkd.config import Config, load_config
from fastkd.data import LoaderSpec, build_loader, prepare_data_root, shared_split_indexes
from fastkd.distributed import cleanup, fail_together, init_distributed
from fastkd.engine import evaluate, resolve_precision
from fastkd.errors import ModelError, UserError
from fastkd.logging import setup_console
from fastkd.models import create_model, load_weights, memory_format


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """Load ``checkpoint`` into ``cfg.student.arch`` and evaluate it on the validation split."""
    dist = init_distributed(cfg.train.device, cfg.run.setup_timeout_min)
    setup_console(dist.is_main)
    device = dist.device
    precision = resolve_precision(cfg.train.amp, device)
    spec = LoaderSpec(
        cfg.data,
        "val",
        device=device,
        rank=dist.rank,
        world_size=dist.world_size,
        channels_last=cfg.train.channels_last,
    )
    prepare_data_root(cfg.data, dist)
    # Under torchrun, a path missing on one node stops every rank (not only that one).
    (index,) = shared_split_indexes(cfg.data, dist, ("val",)).values()
    with fail_together(dist, "loading the validation data and the checkpoint"):
        loader = build_loader(index, spec)
        if not (str(checkpoint).startswith("torchvision:") or Path(checkpoint).is_file()):
            raise ModelError(
                f"--checkpoint {checkpoint}: no such file; pass a run's student.pt, last.pt or "
                "best.pt (or torchvision:WEIGHTS_NAME)"
            )
        model = create_model(cfg.student.arch, loader.num_classes)
        load_weights(
            model,
            str(checkpoint),
            arch=cfg.student.arch,
            num_classes=loader.num_classes,
            role="student",
        )
    model = model.to(device=device, memory_format=memory_format(cfg.train.channels_last))
    try:
        result = evaluate(model, loader, precision, device)
    finally:
        loader.close()
    return {
        "checkpoint": str(checkpoint),
        "arch": cfg.student.arch,
        "data_root": cfg.data.root,
        "top1": result["top1"],
        "top5": result["top5"],
        "num_images": result["num_images"],
        "loss": result["loss"],
        "precision": precision.name,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user mistakes print one ``fastkd: error:`` line and return 2."""
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--config", required=True, help="YAML config (data.* and student.arch are used)"
    )
    parser.add_argument("--checkpoint", required=True, help="student.pt, last.pt or best.pt")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = evaluate_checkpoint(cfg, args.checkpoint)
    except UserError as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    print(
        f"top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  num_images {result['num_images']}"
    )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
