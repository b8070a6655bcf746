"""What a loader produces (`LoaderSpec`), what it offers (`Loader`), and what both backends share.

A `LoaderSpec` binds the ``data`` section of a config to one split, one rank and the run's
device, dtype and memory format; it is the one object a backend is built from. `PlannedLoader`
is the prologue both backends share: the split's index, the per-rank `ShardPlan` (order,
sharding, per-sample augmentation seeds) and the epoch selection, which may start a pass in the
middle of the epoch (an exact resume: the same batches an uninterrupted pass yields there).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from fastkd.config import DataConfig
from fastkd.data.folder import SplitIndex
from fastkd.data.sharding import ShardPlan
from fastkd.models import memory_format


@runtime_checkable
class Loader(Protocol):
    """What the trainer relies on from a loader of either backend.

    Iterating yields ``(images, labels)``: images N x 3 x H x W in channels_last memory
    (contiguous NCHW with ``channels_last=False``), normalized with ``data.mean``/``data.std``
    (0-255 scale), of the spec's dtype, on its device; labels int64 (N,) on the device.
    """

    backend: str  # "dali-gpu", "dali-cpu" or "torch"
    batch_size: int  # images per batch (training batches are always full)
    num_classes: int
    classes: list[str]  # class folder names; label i is classes[i]
    num_samples: int  # images this rank yields per epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...  # batches this rank yields per (whole) epoch

    @property
    def pass_batches(self) -> int: ...  # batches the next pass yields: len(self) - start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch of the next passes, and the batch they start from.

        A pass then yields batches ``[start_batch:]`` of the epoch, bitwise the batches an
        uninterrupted pass yields there (order and augmentation depend on (seed, epoch,
        position) only): resuming from a checkpoint written after k steps of an epoch is
        ``set_epoch(epoch, start_batch=k)``. ``0 <= start_batch <= len(self)``, else ValueError.
        """
        ...

    def shard_indices(self) -> np.ndarray: ...  # file positions of the whole epoch, in order

    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)  # holds the (mutable) DataConfig: compared by identity
class LoaderSpec:
    """One split's loader for one rank: the ``data`` section plus what the run decides.

    ``seed`` and ``max_batches`` (0 = all; ``train.max_steps_per_epoch``) only shape training;
    ``dtype`` is float32 or float16 (``data.output_dtype`` resolved by the caller).
    """

    data: DataConfig
    split: Literal["train", "val"]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    max_batches: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "val"):
            raise ValueError(f"a loader's split is 'train' or 'val', not {self.split!r}")
        if self.dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"loader dtype must be torch.float32 or torch.float16, got {self.dtype}"
            )
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        object.__setattr__(self, "device", device)

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def batch_size(self) -> int:
        """Images per batch: ``data.batch_size``, or ``data.val_batch_size`` (if set) for val."""
        if self.train:
            return self.data.batch_size
        return self.data.val_batch_size or self.data.batch_size

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)


class PlannedLoader:
    """The part of a loader both backends share: index, classes, shard plan, epoch."""

    def __init__(self, index: SplitIndex, spec: LoaderSpec) -> None:
        if index.split != spec.split:
            raise ValueError(
                f"a {spec.split} loader needs the {spec.split} index, got {index.split}"
            )
        self.index, self.spec = index, spec
        self.classes = list(index.classes)
        self.num_classes = len(index.classes)
        self.device, self.dtype, self.train = spec.device, spec.dtype, spec.train
        self.batch_size, self.channels_last = spec.batch_size, spec.channels_last
        self.plan = ShardPlan(
            len(index),
            train=spec.train,
            batch_size=spec.batch_size,
            rank=spec.rank,
            world_size=spec.world_size,
            seed=spec.seed if spec.train else 0,
            max_batches=spec.max_batches if spec.train else 0,
        )
        self.num_samples = self.plan.num_samples
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        """Batches of a whole epoch, whatever ``start_batch`` is (the trainer counts on it)."""
        return self.plan.num_batches

    @property
    def pass_batches(self) -> int:
        """Batches the next pass yields: those of the epoch from ``start_batch`` on."""
        return len(self) - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order (and augmentation) the next passes use, and the batch
        they start from (a resume in the middle of the epoch; see `Loader.set_epoch`)."""
        start_batch = operator.index(start_batch)  # an int (a numpy or tensor one from a file)
        if not 0 <= start_batch <= len(self):
            raise ValueError(
                f"start_batch={start_batch} is not in [0, {len(self)}] "
                f"(the batches of epoch {epoch} on this rank)"
            )
        self.epoch, self.start_batch = epoch, start_batch

    def shard_indices(self) -> np.ndarray:
        """Positions in ``index.files`` this rank reads in the current epoch, in order: the whole
        epoch's, also when the next pass starts at ``start_batch`` (its samples are then
        ``[start_batch * batch_size:]`` of them)."""
        return self.plan.indices(self.epoch)
