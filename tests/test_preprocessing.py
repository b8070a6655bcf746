"""Preprocessing constants: ImageNet mean/std in RGB order, applied per channel by every loader.

The defaults must be torchvision's ImageNet statistics on the 0-255 scale, in R, G, B order (the
pretrained teachers were trained with them), and each backend must subtract channel c's mean
and divide by channel c's std from the image's channel c. A loader that reads BGR, or pairs the
constants with the wrong channels, still produces plausible, roughly centred batches; only
images of known colour tell. Solid-colour PNGs (lossless, so the decoded pixel values are exactly
the written ones) with different R, G and B values pin every channel to its own constant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fastkd.config import DataConfig, from_dict
from fastkd.data import build_train_loader, build_val_loader
from fastkd.data.folder import IMAGE_EXTENSIONS

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

CPU = torch.device("cpu")
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "dali",
        id="dali",
        marks=pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed"),
    ),
]
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# One colour per class; R, G and B differ within each colour and sit on both sides of the means,
# and 250 / 5 lie far from them, so swapping two channels' means or stds moves the normalized
# value by well over the tolerance (the smallest such change here, from swapping the R and B
# stds, is about 0.02).
COLOURS = {"class_a": (250, 120, 30), "class_b": (5, 240, 160)}
# Decoding a lossless PNG and resizing a constant image keep the integer pixel value (DALI's and
# torchvision's resamplers round to uint8 and their weights sum to 1); what is left is float32
# rounding in (x - mean) / std.
TOLERANCE = 1e-4


def test_default_mean_and_std_are_torchvision_imagenet_rgb_times_255():
    defaults = DataConfig()
    assert defaults.mean == pytest.approx([255 * v for v in IMAGENET_MEAN_RGB], rel=1e-12)
    assert defaults.std == pytest.approx([255 * v for v in IMAGENET_STD_RGB], rel=1e-12)
    # The same constants as the transforms torchvision ships with its ImageNet weights (what the
    # default teacher, torchvision:IMAGENET1K_V1, was trained with), and in the same order.
    preset = torchvision.models.ResNet34_Weights.IMAGENET1K_V1.transforms()
    assert defaults.mean == pytest.approx([255 * v for v in preset.mean], rel=1e-12)
    assert defaults.std == pytest.approx([255 * v for v in preset.std], rel=1e-12)
    # R has the largest mean, B the smallest: a reversed (BGR) list would fail the line above too.
    assert defaults.mean[0] > defaults.mean[1] > defaults.mean[2]


@pytest.fixture(scope="module")
def solid_colour_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with 2 classes of solid-colour PNGs (non-square, two sizes each)."""
    assert ".png" in IMAGE_EXTENSIONS  # both loaders accept PNG
    root = tmp_path_factory.mktemp("solid") / "root"
    for split in ("train", "val"):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, (height, width) in enumerate([(14, 20), (22, 16)]):
                pixels = np.empty((height, width, 3), dtype=np.uint8)
                pixels[...] = colour
                Image.fromarray(pixels, mode="RGB").save(folder / f"{i}.png")
    return root


def _config(root: Path, backend: str, **data) -> DataConfig:
    base = {
        "root": str(root),
        "backend": backend,
        "dali": {"device": "cpu"},
        "image_size": 8,
        "val_resize": 10,
        "batch_size": 2,
        "workers": 0 if backend == "torch" else 1,
    }
    return from_dict({"data": {**base, **data}}).data


def _check_batches(loader, cfg: DataConfig, classes: list[str]) -> int:
    """Every image of every batch is the normalized colour of its class; returns the count."""
    mean = torch.tensor(cfg.mean, dtype=torch.float64)
    std = torch.tensor(cfg.std, dtype=torch.float64)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, cfg.image_size, cfg.image_size)
        for image, label in zip(images.double(), labels.tolist(), strict=True):
            colour = torch.tensor(COLOURS[classes[label]], dtype=torch.float64)
            expected = ((colour - mean) / std).view(3, 1, 1).expand_as(image)
            torch.testing.assert_close(image, expected, rtol=0, atol=TOLERANCE)
            seen += 1
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_loader_normalizes_each_channel_with_its_own_constants(
    solid_colour_imagefolder, backend
):
    cfg = _config(solid_colour_imagefolder, backend)
    loader = build_val_loader(cfg, device=CPU)
    try:
        assert loader.backend.startswith(backend)  # no silent fallback to the other backend
        assert _check_batches(loader, cfg, loader.classes) == 4
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loader_normalizes_each_channel_with_its_own_constants(
    solid_colour_imagefolder, backend
):
    """Random crops and flips of a solid colour are that colour: the same check for training."""
    cfg = _config(solid_colour_imagefolder, backend)
    loader = build_train_loader(cfg, device=CPU, seed=0)
    try:
        assert loader.backend.startswith(backend)
        assert _check_batches(loader, cfg, loader.classes) == 4
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_applies_configured_constants_per_channel(solid_colour_imagefolder, backend):
    """Distinct custom means and stds per channel: each lands on its own channel, and no default
    constant is used in place of a configured one."""
    cfg = _config(
        solid_colour_imagefolder, backend, mean=[10.0, 100.0, 200.0], std=[2.0, 20.0, 40.0]
    )
    loader = build_val_loader(cfg, device=CPU)
    try:
        assert _check_batches(loader, cfg, loader.classes) == 4
    finally:
        loader.close()
