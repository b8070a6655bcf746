"""Training-pipeline throughput: the DALI loader against the torchvision DataLoader.

Both backends run the same transforms (random-resized crop, flip, normalize) to the same output
(normalized NCHW channels_last batches of one dtype on the device) with the same worker count,
through fastkd's own loaders, i.e. what the trainer gets. The clock starts when the first batch
arrives (pipeline build, worker start-up and the first decode are left out) and runs through
every epoch boundary, which is part of the steady state. Rounds alternate the order of the
backends (torch, dali, then dali, torch, ...) so that neither always runs on a cooler or
quieter machine; the reported rate is total images / total time over the rounds.

    python benchmarks/make_jpegs.py --out /tmp/bench_jpegs
    python benchmarks/bench_data.py --root /tmp/bench_jpegs --json results/bench_data.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import format_table, run_cli, write_json  # noqa: E402

from fastkd.config import from_dict  # noqa: E402
from fastkd.data import build_train_loader  # noqa: E402


def measure(loader: Any, epochs: int) -> tuple[int, float]:
    """Images and seconds after the first batch, over ``epochs`` passes (epochs 0, 1, ...)."""
    images = 0
    start = None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch, _ in loader:
            if start is None:
                start = time.perf_counter()  # the first batch is the start-up, not throughput
                continue
            images += batch.shape[0]
    if start is None:
        raise RuntimeError("the loader produced no batch")
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="ImageFolder root (benchmarks/make_jpegs.py)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="passes per backend and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both backends")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="where the batches go (cpu, cuda)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base = {
        "root": args.root,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "prefetch": args.prefetch,
    }
    totals: dict[str, dict[str, Any]] = {}
    for round_index in range(args.rounds):
        order = ["torch", "dali"] if round_index % 2 == 0 else ["dali", "torch"]
        for backend in order:
            cfg = from_dict({"data": {**base, "backend": backend}}).data
            loader = build_train_loader(cfg, device=device, seed=0, dtype=dtype)
            actual_backend = loader.backend  # "dali" may have fallen back to "torch"
            images, seconds = measure(loader, args.epochs)
            loader.close()
            del loader
            entry = totals.setdefault(
                backend, {"backend": None, "images": 0, "seconds": 0.0, "rounds_img_per_s": []}
            )
            entry["backend"] = actual_backend
            entry["images"] += images
            entry["seconds"] += seconds
            entry["rounds_img_per_s"].append(round(images / seconds, 1))
            print(f"round {round_index}: {backend:5s} {images / seconds:8.1f} img/s", flush=True)

    rows = []
    for requested in ("torch", "dali"):
        entry = totals[requested]
        rows.append(
            {
                "backend": requested,
                "loader": entry["backend"],
                "workers": args.workers,
                "batch": args.batch_size,
                "size": args.image_size,
                "dtype": args.dtype,
                "images": entry["images"],
                "seconds": entry["seconds"],
                "img_per_s": entry["images"] / entry["seconds"],
                "per_round": entry["rounds_img_per_s"],
            }
        )
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    print()
    print(
        format_table(
            rows,
            [
                "backend",
                "loader",
                "workers",
                "batch",
                "size",
                "dtype",
                "images",
                "seconds",
                "img_per_s",
                "per_round",
            ],
        )
    )
    print(f"\nDALI / torch throughput: {ratio:.2f}x")
    config = {k: v for k, v in vars(args).items() if k != "json"}
    write_json(args.json, "bench_data", config, [*rows, {"ratio_dali_over_torch": ratio}])
    return 0


if __name__ == "__main__":
    run_cli(main)
