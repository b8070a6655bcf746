"""Write an ImageNet-like JPEG ImageFolder for data-loading benchmarks.

What matters to a decoder is close to ImageNet: sizes around 500 x 375 in both orientations
with some variety (3:2, 1:1, 16:9, a few small and a few large images), baseline JPEG at
quality 90, and photo-like content (smooth colour fields, soft-edged shapes, striped and
noisy textures, sensor noise) so that files weigh like photographs (~60-150 KB) rather than
like flat synthetic drawings. Classes mean nothing here; only the bytes matter.

    python benchmarks/make_jpegs.py --out /tmp/bench_jpegs --classes 10 --per-class 100
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) shapes and how often they occur: mostly ImageNet's 500 x 375 / 375 x 500.
_SHAPES = [
    ((500, 375), 0.45),
    ((375, 500), 0.15),
    ((500, 333), 0.12),
    ((500, 500), 0.08),
    ((640, 360), 0.06),
    ((333, 500), 0.06),
    ((800, 600), 0.04),
    ((250, 188), 0.04),
]


def _pick_size(rng: np.random.Generator) -> tuple[int, int]:
    sizes, weights = zip(*_SHAPES, strict=True)
    width, height = sizes[int(rng.choice(len(sizes), p=np.array(weights) / sum(weights)))]
    # A little jitter, as real photos are not all exactly 500 x 375.
    scale = rng.uniform(0.9, 1.1)
    return max(64, int(width * scale)), max(64, int(height * scale))


_NOISE_SIDE = 1024
_noise_bank: np.ndarray | None = None


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A unit Gaussian noise window (H x W x 3) cut from a per-process bank at a random place.

    Drawing fresh normals for every pixel costs more than everything else together; a fixed
    bank (same seed in every process) read at random offsets keeps files reproducible.
    """
    global _noise_bank
    if _noise_bank is None:
        bank_rng = np.random.default_rng(12345)
        _noise_bank = bank_rng.standard_normal((_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.float32)
    y = int(rng.integers(0, _NOISE_SIDE - height + 1)) if height < _NOISE_SIDE else 0
    x = int(rng.integers(0, _NOISE_SIDE - width + 1)) if width < _NOISE_SIDE else 0
    window = _noise_bank[y : y + height, x : x + width]
    if window.shape[:2] != (height, width):  # larger than the bank: tile it
        reps = (-(-height // _NOISE_SIDE), -(-width // _NOISE_SIDE), 1)
        window = np.tile(_noise_bank, reps)[:height, :width]
    return window


def render_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth field, soft shapes, textured patches and sensor noise."""
    # Shapes are drawn at half resolution and upscaled bicubically: soft, photo-like edges.
    small = (max(1, width // 2), max(1, height // 2))
    field = rng.uniform(0, 255, size=(4, 5, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize(small, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        cx, cy = rng.uniform(0, small[0]), rng.uniform(0, small[1])
        radius = rng.uniform(0.05, 0.3) * min(small)
        if rng.random() < 0.5:
            draw.ellipse(
                [cx - radius, cy - radius * rng.uniform(0.5, 1.5), cx + radius, cy + radius],
                fill=colour,
            )
        else:
            corners = int(rng.integers(3, 7))
            start = rng.uniform(0, 2 * math.pi)
            points = [
                (
                    cx + radius * math.cos(start + 2 * math.pi * k / corners),
                    cy + radius * math.sin(start + 2 * math.pi * k / corners),
                )
                for k in range(corners)
            ]
            draw.polygon(points, fill=colour)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)

    # Textures over part of the frame (fabric, foliage, fur): stripes and coarse grain.
    y0, x0 = int(rng.uniform(0, height * 0.5)), int(rng.uniform(0, width * 0.5))
    patch = pixels[y0 : y0 + height // 2, x0 : x0 + width // 2]
    yy, xx = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(3, 14)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period))
    patch += (stripes * rng.uniform(15, 40))[..., None]
    y1, x1 = int(rng.uniform(0, height * 0.4)), int(rng.uniform(0, width * 0.4))
    grain = pixels[y1 : y1 + int(height * 0.6), x1 : x1 + int(width * 0.6)]
    grain += _noise(rng, *grain.shape[:2]) * rng.uniform(10, 25)
    # Fine sensor noise everywhere: what makes photographs weigh 100 KB, not 20 KB.
    pixels += _noise(rng, height, width) * rng.uniform(6.0, 10.0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_one(job: tuple[str, int, int]) -> int:
    path, seed, quality = job
    rng = np.random.default_rng(seed)
    width, height = _pick_size(rng)
    buffer = io.BytesIO()
    render_photo(rng, width, height).save(buffer, format="JPEG", quality=quality)
    Path(path).write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    jobs = []
    for split, per_class in (("train", args.per_class), ("val", args.val_per_class)):
        for class_index in range(args.classes):
            folder = out / split / f"class_{class_index:04d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                # Split, class and index in the seed: every file is reproducible on its own.
                seed = (
                    (args.seed * 1_000_003 + (split == "val")) * 1_000_003
                    + class_index * 100_003
                    + i
                )
                jobs.append(
                    (str(folder / f"{split}_{class_index:04d}_{i:05d}.JPEG"), seed, args.quality)
                )
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        sizes = list(pool.map(_write_one, jobs, chunksize=16))
    elapsed = time.perf_counter() - start
    print(
        f"{out}: {len(jobs)} JPEGs ({args.classes} classes), mean {np.mean(sizes) / 1024:.0f} KiB, "
        f"{sum(sizes) / 2**20:.0f} MiB in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
