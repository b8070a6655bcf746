"""Start-up at ImageNet scale: time from launch to the first finished training step.

Writes (or reuses) an ImageFolder of ImageNet's shape under --root: 1,000 class folders with
--train-per-class files each (default 1,281: ImageNet's 1.28 M training images) and
--val-per-class files (default 50). The files are tiny valid JPEGs: what start-up costs is the
walk over the folders and the bad-image pre-scan of every file (two small reads a file), not
the bytes. Then, for each process count of --procs, it launches ``python -m fastkd.train`` (or
``torchrun --nproc_per_node N -m fastkd.train``) on it, a ResNet-18 at 32 px, and stops the run
once its first step is done (the ``compile`` record in metrics.jsonl).

Reported per launch: seconds from launch to the first step, rank 0's scan and pre-scan time (its
log line), how many processes walked or pre-scanned data.root and how often (counted with
tests/scan_probe, which records every walk and pre-scan of every process), and the per-file scan
cost. With --small-per-class a second,
small tree of the same shape gives the fixed cost (imports, models, pipeline), so that

    extrapolated = launch_to_step(small) + per_file_cost * (1,281,167 + 50,000 - files(small))

where per_file_cost is the slope between the two trees. With the default sizes the large tree
is ImageNet's size and nothing needs extrapolating; it is reported all the same.

    python benchmarks/bench_startup.py --root /tmp/imagenet_shape --procs 1,2 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from common import format_table, run_cli, write_json  # noqa: E402

from fastkd.errors import DataError  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
MARKER = ".bench_startup.json"
_SCAN_LINE = re.compile(r"data: (.*) images scanned(?: and pre-scanned)? in ([0-9.]+)s")


def _templates(count: int = 16) -> list[bytes]:
    """A few distinct tiny JPEGs (~1 KB each) that every file of the tree copies."""
    out = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


def make_tree(root: Path, classes: int, train_per_class: int, val_per_class: int) -> int:
    """Write the tree (reused when its marker says it has these sizes); returns its file count."""
    shape = {"classes": classes, "train_per_class": train_per_class, "val": val_per_class}
    marker = root / MARKER
    total = classes * (train_per_class + val_per_class)
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return total
    if root.exists():
        if not marker.is_file():
            raise DataError(
                f"{root} exists and was not written by bench_startup (it deletes and rewrites "
                "its trees): pick another --root"
            )
        shutil.rmtree(root)
    templates = _templates()
    start = time.perf_counter()
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{split}_{c:08d}_{i:06d}.JPEG").write_bytes(templates[(7 * c + i) % 16])
    marker.write_text(json.dumps(shape))
    print(f"wrote {total} files under {root} in {time.perf_counter() - start:.0f}s", flush=True)
    return total


def _config(tmp: Path, root: Path, run_dir: Path) -> Path:
    tree = {
        "run": {"dir": str(run_dir)},
        "data": {
            "root": str(root),
            "image_size": 32,
            "val_resize": 36,
            "batch_size": 32,
            "workers": 2,
        },
        "student": {"arch": "resnet18"},
        "loss": {"kind": "ce"},
        "train": {
            "epochs": 1,
            "max_steps_per_epoch": 2,
            "compile": False,
            "device": "cpu",
            "log_every": 1,
        },
    }
    path = tmp / "startup.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _first_step_time(metrics: Path) -> float | None:
    if not metrics.is_file():
        return None
    for line in metrics.read_text().splitlines():
        if line.strip() and json.loads(line).get("event") == "compile":
            return json.loads(line)["time"]
    return None


def launch(root: Path, procs: int, timeout_s: float) -> dict[str, Any]:
    """Start a run on ``root`` with ``procs`` processes; stop it after its first step."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = _config(tmp, root, tmp / "run")
        scans = tmp / "scans.log"
        probe = str(REPO / "tests" / "scan_probe")
        env = {
            **os.environ,
            "FASTKD_TEST_SCAN_LOG": str(scans),
            "PYTHONPATH": os.pathsep.join(filter(None, [probe, os.environ.get("PYTHONPATH")])),
        }
        if procs == 1:
            command = [sys.executable, "-m", "fastkd.train", "--config", str(config)]
        else:
            torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
            command = [
                torchrun,
                "--nproc_per_node",
                str(procs),
                "-m",
                "fastkd.train",
                "--config",
                str(config),
            ]
        log_path = tmp / "log.txt"
        with open(log_path, "w") as log:
            launched = time.time()
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            first_step = None
            while first_step is None and proc.poll() is None:
                if time.time() - launched > timeout_s:
                    break
                time.sleep(0.2)
                first_step = _first_step_time(tmp / "run" / "metrics.jsonl")
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        output = log_path.read_text()
        if first_step is None:
            raise RuntimeError(
                f"no first step within {timeout_s:.0f}s ({procs} processes):\n{output[-3000:]}"
            )
        scan = _SCAN_LINE.search(output)
        scan_lines = scans.read_text().splitlines() if scans.is_file() else []
        return {
            "procs": procs,
            "launch_to_first_step_s": first_step - launched,
            "rank0_scan_s": float(scan.group(2)) if scan else None,
            "scanned": scan.group(1) if scan else None,
            "processes_that_scanned": len({line.split()[0] for line in scan_lines}),
            "walks": sum(line.split()[1] == "walk" for line in scan_lines),
            "prescans": sum(line.split()[1] == "prescan" for line in scan_lines),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="where the generated tree lives (reused)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-per-class", type=int, default=1281)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument(
        "--small-per-class",
        type=int,
        default=2,
        help="train files per class of the small tree (fixed cost); 0: none",
    )
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",")]
    root = Path(args.root)
    trees = [("large", root / "large", args.train_per_class, args.val_per_class)]
    if args.small_per_class:
        trees.insert(0, ("small", root / "small", args.small_per_class, 1))
    results = []
    for name, tree, per_class, val in trees:
        files = make_tree(tree, args.classes, per_class, val)
        for count in procs:
            row = {"tree": name, "files": files, **launch(tree, count, args.timeout)}
            if row["rank0_scan_s"]:
                row["scan_us_per_file"] = 1e6 * row["rank0_scan_s"] / files
            results.append(row)
            print(format_table([row], list(row)), flush=True)
    by_key = {(r["tree"], r["procs"]): r for r in results}
    for count in procs:
        small, large = by_key.get(("small", count)), by_key[("large", count)]
        if small is None:
            continue
        slope = (large["launch_to_first_step_s"] - small["launch_to_first_step_s"]) / max(
            1, large["files"] - small["files"]
        )
        large["us_per_file"] = 1e6 * slope
        large["extrapolated_imagenet_s"] = small["launch_to_first_step_s"] + slope * (
            IMAGENET_TRAIN_IMAGES + 50_000 - small["files"]
        )
    columns = [
        "tree",
        "files",
        "procs",
        "launch_to_first_step_s",
        "rank0_scan_s",
        "scan_us_per_file",
        "processes_that_scanned",
        "us_per_file",
        "extrapolated_imagenet_s",
    ]
    print(format_table(results, columns))
    write_json(args.json, "bench_startup", vars(args), results)
    return 0


if __name__ == "__main__":
    run_cli(main)
