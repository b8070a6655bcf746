"""A generated JPEG ImageFolder for the quickstart, tests and CPU experiments.

Each class is a combination of three cues of one main object: its shape (circle, square,
triangle, cross, star), its colour (eight hues) and the orientation of the stripes painted on it
(0, 45, 90 or 135 degrees, fixed in image coordinates while the shape itself rotates freely).
No single cue identifies a class, so a model has to combine them. Classes come in pairs that
share two cues and differ in the third by a small step (45 degrees of stripe angle, a
neighbouring hue, or another shape), so soft labels of a good teacher carry real information
about which classes look alike.

Nuisances make it non-trivial: random position, size and rotation, a smooth coloured background
with faint stripes of its own, smaller distractor shapes (some striped) partly hidden by the
object, hue/saturation/brightness jitter, contrast jitter and Gaussian noise, JPEG quality 90.

The set is a pure function of the `SyntheticConfig` fields: every image draws from its own
generator seeded with (seed, split, class, index), and the same fields give byte-identical
files. It is written into a temporary folder renamed into place at the end (concurrent ranks
may race; the loser drops its copy), with a marker file recording the fields, so a finished set
is recognized and a set made with other fields is never mistaken for it.

    python -m fastkd.data.synthetic --out data/synthetic --num-classes 10
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastkd.config import DATA_ROOT_EMPTY, DataConfig, SyntheticConfig
from fastkd.data.folder import scan_imagefolder
from fastkd.errors import DataError, UserError

MARKER_NAME = ".fastkd_synthetic.json"
# Bump when the rendering changes: a set written by another version must not pass for this one.
GENERATOR_VERSION = 2  # 2: stripe periods scale with the image size
JPEG_QUALITY = 90

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
HUES: dict[str, float] = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 55.0,
    "green": 115.0,
    "teal": 170.0,
    "blue": 215.0,
    "purple": 270.0,
    "pink": 320.0,
}
COLOURS: tuple[str, ...] = tuple(HUES)
ORIENTATIONS: tuple[int, ...] = (0, 45, 90, 135)
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(ORIENTATIONS)
# Part of every image's seed, so train and val images never share a generator.
SPLITS_ID = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ClassSpec:
    """The three cues that define one class."""

    shape: str
    colour: str
    orientation: int

    def folder_name(self, index: int, width: int) -> str:
        """Sorted folder names follow class indices (zero padded), and say what the class is."""
        return f"{index:0{width}d}_{self.colour}_{self.shape}_{self.orientation}deg"


def class_specs(num_classes: int) -> list[ClassSpec]:
    """The first ``num_classes`` classes: pairs that differ in exactly one cue.

    The class definitions do not depend on the seed (the seed only changes the samples), so
    sets of the same size always mean the same classes.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(
            f"data.synthetic.num_classes={num_classes}: the generator defines 2 to {MAX_CLASSES} "
            "classes (shape x colour x stripe orientation)"
        )
    combos = [
        (s, c, o)
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for o in range(len(ORIENTATIONS))
    ]
    # A fixed shuffle breaks ties, so the class list is the same on every machine.
    tie_break = {
        combo: rank
        for rank, combo in enumerate(
            combos[int(k)] for k in np.random.default_rng(20210118).permutation(len(combos))
        )
    }
    uses = [dict.fromkeys(range(n), 0) for n in (len(SHAPES), len(COLOURS), len(ORIENTATIONS))]
    chosen: list[tuple[int, int, int]] = []

    def take(combo: tuple[int, int, int]) -> None:
        chosen.append(combo)
        for cue, value in enumerate(combo):
            uses[cue][value] += 1

    while len(chosen) < num_classes:
        # The next pair's base: the free combination whose cues are the least used so far,
        # which spreads shapes, colours and orientations evenly over the classes.
        free = [combo for combo in combos if combo not in chosen]
        base = min(free, key=lambda c: (sum(uses[i][c[i]] for i in range(3)), tie_break[c]))
        take(base)
        if len(chosen) == num_classes:
            break
        pair = len(chosen) // 2
        for step in range(3):
            cue = (pair + step) % 3
            partner = list(base)
            if cue == 0:
                partner[2] = (base[2] + 1) % len(ORIENTATIONS)  # stripes 45 degrees apart
            elif cue == 1:
                partner[1] = (base[1] + 1) % len(COLOURS)  # the neighbouring hue
            else:
                partner[0] = (base[0] + 1) % len(SHAPES)  # another shape
            candidate = (partner[0], partner[1], partner[2])
            if candidate not in chosen:
                take(candidate)
                break
    return [ClassSpec(SHAPES[s], COLOURS[c], ORIENTATIONS[o]) for s, c, o in chosen]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the shape's outline in units of its radius (<0 inside)."""
    if shape == "circle":
        return np.sqrt(u * u + v * v) - 0.95
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":
        k = math.sqrt(3.0) / 2.0
        return np.maximum.reduce([v - 0.5, -k * u - 0.5 * v - 0.5, k * u - 0.5 * v - 0.5]) * 1.6
    if shape == "cross":
        arm = 0.34
        horizontal = np.maximum(np.abs(u) - 1.0, np.abs(v) - arm)
        vertical = np.maximum(np.abs(u) - arm, np.abs(v) - 1.0)
        return np.minimum(horizontal, vertical)
    if shape == "star":
        radius = np.sqrt(u * u + v * v)
        angle = np.arctan2(v, u)
        return radius - (0.55 + 0.45 * (0.5 + 0.5 * np.cos(5.0 * angle)))
    raise ValueError(f"unknown shape {shape!r}")


def _stripes(
    xx: np.ndarray, yy: np.ndarray, angle_deg: float, period: float, phase: float
) -> np.ndarray:
    """A soft square wave in [0, 1] across the direction ``angle_deg`` (0 = vertical stripes)."""
    angle = math.radians(angle_deg)
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2.0 * math.pi / period) + phase)
    return np.clip(wave * 2.5, -1.0, 1.0) * 0.5 + 0.5


def _colour(rng: np.random.Generator, hue_deg: float, jitter_deg: float) -> np.ndarray:
    hue = ((hue_deg + rng.uniform(-jitter_deg, jitter_deg)) % 360.0) / 360.0
    saturation = rng.uniform(0.55, 1.0)
    value = rng.uniform(0.55, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


def _paint_shape(
    canvas: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    *,
    shape: str,
    centre: tuple[float, float],
    radius: float,
    rotation: float,
    colour: np.ndarray,
    stripes: tuple[float, float, float, float] | None,
) -> None:
    """Blend one (optionally striped) shape into ``canvas`` (H x W x 3 floats in [0, 1])."""
    dx, dy = xx - centre[0], yy - centre[1]
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    u = (dx * cos_r + dy * sin_r) / radius
    v = (-dx * sin_r + dy * cos_r) / radius
    # One pixel of soft edge: cheap antialiasing.
    coverage = np.clip(0.5 - _shape_distance(shape, u, v) * radius, 0.0, 1.0)[..., None]
    fill = np.broadcast_to(colour, canvas.shape)
    if stripes is not None:
        angle, period, phase, darkness = stripes
        band = _stripes(xx, yy, angle, period, phase)[..., None]
        fill = fill * (1.0 - darkness * band)
    canvas *= 1.0 - coverage
    canvas += coverage * fill


def render_image(spec: ClassSpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """One ``size`` x ``size`` RGB uint8 image of class ``spec`` drawn with generator ``rng``."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    xx, yy = np.meshgrid(coords, coords)

    # Background: a smooth random colour field, desaturated, with faint stripes of its own.
    grid = rng.uniform(0.1, 0.9, size=(3, 3, 3))
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + rng.uniform(0.2, 0.6) * (grid - grey)
    field = Image.fromarray((grid * 255.0).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    canvas = np.asarray(field, dtype=np.float32) / 255.0
    # Stripe periods scale with the image, so the cue survives any generated size.
    faint = _stripes(
        xx, yy, rng.uniform(0.0, 180.0), size * rng.uniform(0.06, 0.17), rng.uniform(0, 6.3)
    )
    canvas *= (1.0 - rng.uniform(0.0, 0.12) * faint)[..., None]

    def distractor() -> None:
        stripes = None
        if rng.random() < 0.7:
            stripes = (
                rng.uniform(0, 180),
                size * rng.uniform(0.06, 0.13),
                rng.uniform(0, 2 * math.pi),
                rng.uniform(0.25, 0.6),
            )
        _paint_shape(
            canvas,
            xx,
            yy,
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            centre=(rng.uniform(0, size), rng.uniform(0, size)),
            radius=size * rng.uniform(0.08, 0.2),
            rotation=rng.uniform(0, 2 * math.pi),
            colour=_colour(rng, rng.uniform(0, 360), 0.0),
            stripes=stripes,
        )

    # Distractors: shapes of any kind, colour and stripes; their sizes overlap the object's, so
    # "the biggest thing" is only usually the object.
    for _ in range(int(rng.integers(2, 6))):
        distractor()

    # The object that defines the class.
    radius = size * rng.uniform(0.16, 0.32)
    margin = radius * 0.75
    _paint_shape(
        canvas,
        xx,
        yy,
        shape=spec.shape,
        centre=(rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)),
        radius=radius,
        rotation=rng.uniform(0, 2 * math.pi),
        colour=_colour(rng, HUES[spec.colour], 10.0),
        stripes=(
            spec.orientation + rng.uniform(-12.0, 12.0),
            size * rng.uniform(0.09, 0.15),
            rng.uniform(0, 2 * math.pi),
            rng.uniform(0.25, 0.55),
        ),
    )
    if rng.random() < 0.3:  # sometimes something passes in front of it
        distractor()

    # Photometric jitter and sensor noise.
    canvas = (canvas - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)
    canvas = canvas * 255.0 + rng.normal(0.0, rng.uniform(4.0, 14.0), size=canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Baseline JPEG bytes (deterministic for a given libjpeg) of an RGB uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writing the folder
# ---------------------------------------------------------------------------------------------


def marker_params(cfg: SyntheticConfig) -> dict[str, Any]:
    """What the marker file records: every field that changes the bytes, and the version."""
    params = dataclasses.asdict(cfg)
    params.pop("enabled", None)
    return {"generator": "fastkd.data.synthetic", "version": GENERATOR_VERSION, **params}


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a generated set at ``root``, or None when there is none."""
    path = root / MARKER_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"unreadable": str(path)}


def _write_split(
    root: Path, split: str, specs: list[ClassSpec], per_class: int, cfg: SyntheticConfig
) -> None:
    width = max(2, len(str(len(specs) - 1)))
    split_id = SPLITS_ID[split]
    for class_index, spec in enumerate(specs):
        folder = root / split / spec.folder_name(class_index, width)
        folder.mkdir(parents=True)
        for image_index in range(per_class):
            rng = np.random.default_rng([cfg.seed, split_id, class_index, image_index])
            pixels = render_image(spec, rng, cfg.image_size)
            (folder / f"{split}_{class_index:0{width}d}_{image_index:05d}.JPEG").write_bytes(
                encode_jpeg(pixels)
            )


def _mismatch_error(root: Path, found: dict[str, Any], wanted: dict[str, Any]) -> DataError:
    differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    details = ", ".join(
        f"{k}: {found.get(k)!r} there vs {wanted.get(k)!r} wanted" for k in differing
    )
    return DataError(
        f"{root} holds a synthetic data set generated with other parameters ({details}): "
        "delete that folder to regenerate it, or set data.root to another folder"
    )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def make_synthetic_imagefolder(root: str | os.PathLike, cfg: SyntheticConfig) -> Path:
    """Generate the set described by ``cfg`` at ``root`` (no-op when it is already there).

    Raises `DataError` when ``root`` holds a set generated with other parameters, or anything
    else that is not a generated set (never overwritten). An empty folder counts as missing.
    """
    root = Path(root).expanduser()
    wanted = marker_params(cfg)
    if root.exists() and not _is_empty_dir(root):
        found = read_marker(root)
        if found is None:
            raise DataError(
                f"{root} exists and is not a fastkd synthetic data set (no {MARKER_NAME}): it is "
                "never overwritten; choose another folder for the synthetic set"
            )
        if found != wanted:
            raise _mismatch_error(root, found, wanted)
        return root
    specs = class_specs(cfg.num_classes)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_split(tmp, "train", specs, cfg.train_per_class, cfg)
        _write_split(tmp, "val", specs, cfg.val_per_class, cfg)
        (tmp / MARKER_NAME).write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        try:
            # rename() replaces an empty folder and fails on a non-empty one, which is the case
            # when another process (another rank) finished first.
            os.rename(tmp, root)
        except OSError:
            found = read_marker(root)
            if found is None:
                raise
            if found != wanted:
                raise _mismatch_error(root, found, wanted) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare_synthetic(cfg: DataConfig) -> None:
    """Generate ``cfg.synthetic`` at ``cfg.root`` when enabled and missing; leave user data alone."""
    if not cfg.synthetic.enabled:
        return
    if not cfg.root:
        raise DataError(DATA_ROOT_EMPTY)
    root = Path(cfg.root).expanduser()
    if root.exists() and not _is_empty_dir(root) and read_marker(root) is None:
        warnings.warn(
            f"data.synthetic.enabled is set but {root} already holds data that fastkd did not "
            "generate; using that data as is",
            stacklevel=3,
        )
        return
    make_synthetic_imagefolder(root, cfg.synthetic)


def main(argv: list[str] | None = None) -> int:
    """Command line: write a synthetic ImageFolder to --out."""
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.data.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder to create (must not hold other data)")
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class)
    parser.add_argument("--val-per-class", type=int, default=defaults.val_per_class)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = SyntheticConfig(  # checks its ranges
            enabled=True,
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.seed,
        )
        root = make_synthetic_imagefolder(args.out, cfg)
    except UserError as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return 2
    index = scan_imagefolder(root, num_classes=cfg.num_classes)
    print(
        f"{root}: {index.num_classes} classes, {len(index.train)} train + {len(index.val)} val "
        f"images of {cfg.image_size}x{cfg.image_size} px ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
