"""Shared fixtures: a tiny synthetic ImageFolder and configs pointing at it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastkd.config import DataConfig, SyntheticConfig, deep_merge, from_dict
from fastkd.data.synthetic import make_synthetic_imagefolder

# 4 classes, 6 train + 5 val images each, 64 px: enough for sharding and order tests, small
# enough to decode in milliseconds. The counts are deliberately not multiples of common batch
# sizes, so partial batches show up.
TINY_SYNTHETIC = SyntheticConfig(
    enabled=True, num_classes=4, train_per_class=6, val_per_class=5, image_size=64, seed=0
)


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated ImageFolder (train/ and val/, 4 classes, 24 + 20 JPEGs of 64 px).

    Shared by the whole session: tests must not modify it (copy it to ``tmp_path`` first).
    """
    root = tmp_path_factory.mktemp("data") / "tiny"
    return make_synthetic_imagefolder(root, TINY_SYNTHETIC)


@pytest.fixture
def make_data_config(tiny_imagefolder: Path) -> Callable[..., DataConfig]:
    """Factory of validated `DataConfig`s for the tiny set: ``make_data_config(batch_size=4)``.

    Keyword arguments override ``data.*`` keys (``root`` too); defaults suit 64 px CPU tests
    (image_size 56, val_resize 64, batch 4, no worker processes).
    """

    def make(**data: Any) -> DataConfig:
        base = {
            "root": str(tiny_imagefolder),
            "image_size": 56,
            "val_resize": 64,
            "batch_size": 4,
            "workers": 0,
        }
        return from_dict({"data": deep_merge(base, data)}).data

    return make
