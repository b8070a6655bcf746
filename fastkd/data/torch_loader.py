"""The torchvision ``DataLoader`` backend: the fallback without DALI and the benchmarks' baseline.

A standard pipeline on purpose: PIL decoding and torchvision transforms in ``cfg.workers``
worker processes (train: ``RandomResizedCrop(scale=data.crop_area, ratio=(3/4, 4/3))`` +
``RandomHorizontalFlip``; val: ``Resize(val_resize)`` + ``CenterCrop(image_size)``; bilinear,
antialiased), uint8 HWC batches (pinned when the device is CUDA) moved to the device, where they
become normalized NCHW tensors of the requested dtype: channels_last memory (a stride change, no
copy) with ``train.channels_last``, else contiguous NCHW. Order and sharding come from
`fastkd.data.sharding.ShardPlan`, so this loader reads exactly the files the DALI loader reads.

Augmentation randomness is seeded per sample from (seed, epoch, position in the epoch), which
makes a sample's crop independent of the number of workers and of which worker decodes it; a
sample's crop never depends on where a run resumed either: a pass started at batch k
(``set_epoch(epoch, start_batch=k)``) yields bitwise the batches k, k+1, ... of a whole pass.
Bad images met at run time: ``on_bad_image=error`` stops with a `DataError` naming the file;
``skip`` warns and, for training, puts the next file of the list in its place (fixed batch
shape), for validation leaves it out (the batch gets one image shorter); with worker processes
the warning is printed by the worker that met the file.

Worker processes ignore SIGINT and SIGTERM (`ignore_stop_signals`): the main process handles
them (a preempted run checkpoints first) and shuts its workers down itself.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from fastkd.data.folder import SplitIndex, bad_image_error, bad_image_message
from fastkd.data.sharding import ShardPlan
from fastkd.data.spec import LoaderSpec, PlannedLoader
from fastkd.errors import DataError

# A run of this many undecodable files in a row under on_bad_image=skip means something else is
# wrong (a whole folder unreadable), so stop instead of skipping on forever.
_MAX_CONSECUTIVE_BAD = 16


def train_transform(
    image_size: int, crop_area: tuple[float, float] = (0.08, 1.0)
) -> transforms.Compose:
    """torchvision's standard ImageNet training augmentation (without ToTensor/Normalize)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                image_size,
                scale=crop_area,
                ratio=(3.0 / 4.0, 4.0 / 3.0),
                interpolation=InterpolationMode.BILINEAR,
                antialias=True,
            ),
            transforms.RandomHorizontalFlip(),
        ]
    )


def val_transform(image_size: int, val_resize: int) -> transforms.Compose:
    """torchvision's standard evaluation transform (without ToTensor/Normalize)."""
    return transforms.Compose(
        [
            transforms.Resize(val_resize, interpolation=InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(image_size),
        ]
    )


class ImageFileDataset(Dataset):
    """Decodes and transforms one file per key ``(position, augmentation seed)``; HWC uint8 out."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        transform: transforms.Compose,
        *,
        train: bool,
        on_bad_image: Literal["error", "skip"],
    ) -> None:
        self.files = tuple(files)
        self.labels = tuple(labels)
        self.transform = transform
        self.train = train
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.files)

    def _augment(self, image: Image.Image, sample_seed: int) -> Image.Image:
        if get_worker_info() is not None:
            # A worker process owns its global generator, and torchvision draws from it.
            torch.manual_seed(sample_seed)
            return self.transform(image)
        # In the main process (workers=0) keep the caller's generator untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(image)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        position, sample_seed = int(key[0]), int(key[1])
        for _ in range(_MAX_CONSECUTIVE_BAD):
            path = self.files[position]
            try:
                with Image.open(path) as encoded:
                    image = encoded.convert("RGB")
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError...
                problem = bad_image_message(path, f"cannot be decoded ({exc})")
                if self.on_bad_image == "error":
                    raise bad_image_error([problem]) from None
                if not self.train:
                    warnings.warn(f"data.on_bad_image=skip: leaving out {problem}", stacklevel=2)
                    return None
                warnings.warn(
                    f"data.on_bad_image=skip: using the next file instead of {problem}",
                    stacklevel=2,
                )
                position = (position + 1) % len(self.files)
                continue
            image = self._augment(image, sample_seed)
            return torch.from_numpy(np.array(image, dtype=np.uint8)), self.labels[position]
        raise DataError(
            f"{_MAX_CONSECUTIVE_BAD} images in a row could not be decoded near {self.files[position]}: "
            "check that the data set is readable"
        )


def collate_skipping_missing(batch: list[tuple[torch.Tensor, int] | None]) -> Any:
    """``default_collate`` without the samples a skipped bad image left out (None if all were)."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)


class _PlanSampler(Sampler[tuple[int, int]]):
    """Yields ``(position, augmentation seed)`` of the plan's samples for ``epoch``, in order,
    from batch ``start_batch`` on (seeds cut with the positions: a batch keeps its crops).

    It holds no reference back to the loader: a loader -> DataLoader -> sampler -> loader cycle
    would outlive the last reference until a garbage collection, which may then run inside a
    forked worker of another loader and try to shut down workers that are not its children.
    """

    def __init__(self, plan: ShardPlan) -> None:
        self.plan = plan
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.start_batch * self.plan.batch_size
        positions = self.plan.indices(self.epoch)[start:].tolist()
        seeds = self.plan.sample_seeds(self.epoch)[start:].tolist()
        return iter(zip(positions, seeds, strict=True))

    def __len__(self) -> int:
        return max(0, self.plan.num_samples - self.start_batch * self.plan.batch_size)


def ignore_stop_signals(worker_id: int) -> None:
    """The DataLoader's ``worker_init_fn``: a worker process ignores SIGINT and SIGTERM.

    SLURM preemption (SIGTERM) and Ctrl-C (SIGINT) reach every process of the job or of the
    terminal's process group, workers included. The trainer's main process handles the signal
    by finishing its step and writing a checkpoint; a worker killed by the same signal would
    make the DataLoader raise "worker killed by signal" first. The main process still shuts its
    workers down itself (`TorchLoader.close`), and PyTorch's watchdog ends workers whose parent
    died.
    """
    del worker_id  # the same for every worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _unwrap_worker_error(exc: DataError) -> str:
    """The original message of a `DataError` re-raised by the DataLoader from a worker.

    The DataLoader re-raises a worker's exception with the worker's whole traceback as its
    message; the user should see only the one line that says which file and what to do.
    """
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    return text.rstrip().rsplit("DataError: ", 1)[-1]


class TorchLoader(PlannedLoader):
    """Batches ``(images, labels)`` of one split for one rank from a torchvision DataLoader.

    See `fastkd.data.spec.Loader` for the protocol every loader follows.
    """

    backend = "torch"

    def __init__(self, index: SplitIndex, spec: LoaderSpec) -> None:
        super().__init__(index, spec)
        data = spec.data
        if self.train:
            transform = train_transform(data.image_size, (data.crop_area[0], data.crop_area[1]))
        else:
            transform = val_transform(data.image_size, data.val_resize)
        dataset = ImageFileDataset(
            index.files, index.labels, transform, train=self.train, on_bad_image=data.on_bad_image
        )
        self._mean = torch.tensor(data.mean, dtype=torch.float32, device=self.device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor(data.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._sampler = _PlanSampler(self.plan)
        self._dataloader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=self.train,  # the plan already holds whole batches; this states the intent
            num_workers=data.workers,
            collate_fn=collate_skipping_missing,
            pin_memory=self.device.type == "cuda",
            persistent_workers=data.workers > 0,
            prefetch_factor=data.prefetch if data.workers > 0 else None,
            # The DataLoader draws its workers' base seed from this generator; without one it
            # would draw from the global generator and shift the trainer's random stream at
            # every pass. (Augmentation does not use that seed: see _PlanSampler.)
            generator=torch.Generator().manual_seed(self.plan.seed),
            # Preemption and Ctrl-C are the main process's to handle: see ignore_stop_signals.
            worker_init_fn=ignore_stop_signals,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order (and augmentation seeds) the next passes use, and the
        batch they start from (see `fastkd.data.spec.Loader.set_epoch`)."""
        super().set_epoch(epoch, start_batch)
        # The sampler must not refer back to the loader: it gets the values.
        self._sampler.epoch, self._sampler.start_batch = self.epoch, self.start_batch

    def _to_device(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # HWC -> NCHW is a stride change only: the result is channels_last without a copy, and
        # the conversion and normalization below keep that memory format; an NCHW run gets its
        # contiguous copy in the same pass as the conversion to float.
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        images = images.to(torch.float32, memory_format=self.spec.memory_format)
        images = images.sub_(self._mean).div_(self._std)
        if self.dtype != torch.float32:
            images = images.to(self.dtype)
        return images, labels.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for batch in self._dataloader:
                if batch is None:  # every image of a validation batch was skipped
                    continue
                yield self._to_device(*batch)
        except DataError as exc:
            raise DataError(_unwrap_worker_error(exc)) from None

    def close(self) -> None:
        """Stop the worker processes now (a later pass would start new ones)."""
        iterator = getattr(self._dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            # PyTorch's last resort for a worker that does not exit is SIGTERM, which ours
            # ignore (`ignore_stop_signals`): kill such a worker, or exiting would wait for it.
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5.0)
        self._dataloader._iterator = None
