"""Training and validation batches from an ImageFolder, through DALI or a torchvision DataLoader.

``build_train_loader(cfg.data, device=...)`` and ``build_val_loader(cfg.data, device=...)``
return loaders that all follow one protocol (`Loader`): iterating yields ``(images, labels)``,
images N x 3 x H x W in channels_last memory (contiguous NCHW with ``channels_last=False``),
normalized with ``cfg.mean``/``cfg.std`` (0-255 scale), of the requested dtype, on the device;
labels int64 (N,) on the device.

Backends: ``cfg.backend="dali"`` builds a DALI pipeline (``device="mixed"`` decoding on the GPU
when the device is CUDA and ``cfg.dali.device`` allows it, CPU operators otherwise) and falls back
to ``"torch"`` with one warning when DALI cannot be imported. Both read the same file list (one
scan, `fastkd.data.folder`) in the same per-rank order (`fastkd.data.sharding`).

Bad images (``cfg.on_bad_image``): a cheap pre-scan of every file (signature, size, end marker)
catches empty, truncated and foreign files before the first step; what it misses is caught by
the decoders. ``error`` raises one `DataError` naming the files; ``skip`` warns, leaves them out
and keeps training batches full.

Under torchrun, `shared_split_indexes` scans and pre-scans once per run, on rank 0, and hands
the result to every rank (one process on each other node checks that its copy holds every file);
the builders then take that ``index`` instead of scanning again.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fastkd.config import DataConfig
from fastkd.data.folder import (
    DataError,
    ImageFolderIndex,
    SplitIndex,
    drop_bad_images,
    find_classes,
    scan_imagefolder,
    scan_split,
)
from fastkd.distributed import DistInfo, broadcast_from_main, fail_together

__all__ = [
    "DataError",
    "ImageFolderIndex",
    "Loader",
    "SplitIndex",
    "build_train_loader",
    "build_val_loader",
    "ensure_dataset",
    "find_classes",
    "make_synthetic_imagefolder",
    "scan_imagefolder",
    "scan_split",
]


@runtime_checkable
class Loader(Protocol):
    """What the trainer relies on from a loader of either backend."""

    backend: str  # "dali-gpu", "dali-cpu" or "torch"
    batch_size: int  # images per batch (training batches are always full)
    num_classes: int
    classes: list[str]  # class folder names; label i is classes[i]
    num_samples: int  # images this rank yields per epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...  # batches this rank yields per epoch

    def set_epoch(self, epoch: int) -> None: ...

    def shard_indices(self) -> np.ndarray: ...  # file positions this rank reads, in order

    def close(self) -> None: ...


_warned_no_dali = False


def __getattr__(name: str) -> Any:
    # The generator is imported on first use, so that ``python -m fastkd.data.synthetic`` does
    # not find its own module half-imported by this package.
    if name in ("ensure_dataset", "make_synthetic_imagefolder"):
        from fastkd.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'fastkd.data' has no attribute {name!r}")


def _import_dali_backend() -> Any | None:
    """The DALI backend module, or None (with one warning per process) when DALI is missing."""
    global _warned_no_dali
    try:
        return importlib.import_module("fastkd.data.dali")
    except (ImportError, OSError) as exc:  # OSError: DALI present but its native libraries fail
        if not _warned_no_dali:
            _warned_no_dali = True
            warnings.warn(
                f"data.backend=dali but NVIDIA DALI cannot be imported ({exc}); using the "
                "torchvision DataLoader instead. Install nvidia-dali for your CUDA version, or "
                "set data.backend=torch to silence this warning",
                stacklevel=3,
            )
        return None


def _load_split(cfg: DataConfig, split: str, prescan: bool | None) -> SplitIndex:
    from fastkd.data.synthetic import prepare_synthetic

    prepare_synthetic(cfg)
    index = scan_split(cfg.root, split)
    if prescan is None:
        prescan = cfg.prescan
    if not prescan:
        return index  # bad files are then met (and handled) by the decoders at run time
    return drop_bad_images(index, cfg.on_bad_image)


def scan_splits(
    cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), prescan: bool | None = None
) -> dict[str, SplitIndex]:
    """Scan (and, per ``cfg.prescan``, pre-scan) ``splits`` of ``cfg.root`` in this process."""
    return {split: _load_split(cfg, split, prescan) for split in splits}


def shared_split_indexes(
    cfg: DataConfig, dist: DistInfo, splits: tuple[str, ...] = ("train", "val")
) -> dict[str, SplitIndex]:
    """The indexes of ``splits``, scanned and pre-scanned once per run, by rank 0.

    Rank 0's result (file paths relative to its ``data.root``) goes to every rank over the
    setup group, so the others wait for it without a collective timeout and build their paths
    under their own ``data.root``. One process on each other node (local rank 0) walks that
    node's copy (directory listings only) and checks that every file of the list is there. Any
    rank's failure stops every rank (`fail_together`), rank 0's scan error included. A
    collective: every rank calls it.
    """
    log = logging.getLogger("fastkd")
    failure: Exception | None = None
    payload: Any = None
    if dist.is_main:
        start = time.perf_counter()
        try:
            scanned = scan_splits(cfg, splits)
            payload = {split: index.portable() for split, index in scanned.items()}
            counts = " + ".join(f"{len(index)} {split}" for split, index in scanned.items())
            log.info(
                "data: %s images scanned%s in %.2fs (once, on rank 0)", counts,
                " and pre-scanned" if cfg.prescan else "", time.perf_counter() - start,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - re-raised below, once every rank knows
            failure, payload = exc, "failed"
    payload = broadcast_from_main(payload, dist)
    with fail_together(dist, "reading data.root"):
        if failure is not None:
            raise failure
        if payload == "failed":  # rank 0 failed: fail_together names it on this rank
            return {}
        if dist.is_main:
            return scanned
        from fastkd.data.synthetic import prepare_synthetic

        prepare_synthetic(cfg)  # a node with its own disk generates its copy (same bytes)
        indexes = {
            split: SplitIndex.from_portable(data, cfg.root) for split, data in payload.items()
        }
        if dist.local_rank == 0:  # one walk per node; its other ranks read the same disk
            for index in indexes.values():
                index.check_on_this_node()
    return indexes


def _build(
    cfg: DataConfig,
    split: str,
    *,
    batch_size: int,
    device: torch.device,
    rank: int,
    world_size: int,
    seed: int,
    dtype: torch.dtype,
    prescan: bool | None,
    channels_last: bool,
    max_batches: int = 0,
    index: SplitIndex | None = None,
) -> Loader:
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"loader dtype must be torch.float32 or torch.float16, got {dtype}")
    device = torch.device(device)
    if index is None:
        index = _load_split(cfg, split, prescan)
    elif index.split != split:
        raise ValueError(f"a {split} loader needs the {split} index, got the {index.split} one")
    common: dict[str, Any] = dict(
        train=split == "train",
        image_size=cfg.image_size,
        crop_area=(cfg.crop_area[0], cfg.crop_area[1]),
        val_resize=cfg.val_resize,
        batch_size=batch_size,
        workers=cfg.workers,
        prefetch=cfg.prefetch,
        mean=cfg.mean,
        std=cfg.std,
        on_bad_image=cfg.on_bad_image,
        device=device,
        rank=rank,
        world_size=world_size,
        seed=seed,
        dtype=dtype,
        channels_last=channels_last,
        max_batches=max_batches,
    )
    if cfg.backend == "dali":
        dali_backend = _import_dali_backend()
        if dali_backend is not None:
            if cfg.dali.device == "auto":
                use_gpu = device.type == "cuda"
            else:
                use_gpu = cfg.dali.device == "gpu"
            return dali_backend.DaliLoader(
                index,
                use_gpu=use_gpu,
                hw_decoder_load=cfg.dali.hw_decoder_load,
                preallocate=cfg.dali.preallocate,
                **common,
            )
    from fastkd.data.torch_loader import TorchLoader

    return TorchLoader(index, **common)


def build_train_loader(
    cfg: DataConfig,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    prescan: bool | None = None,
    channels_last: bool = True,
    max_batches: int = 0,
    index: SplitIndex | None = None,
) -> Loader:
    """The training loader of ``rank``: random-resized crops, flips, fixed-shape batches.

    Every batch holds exactly ``cfg.batch_size`` images and every rank yields the same number of
    batches from a disjoint shard; the order and the crops and flips are a function of (``seed``,
    epoch) selected with ``loader.set_epoch(epoch)`` (without it, a second pass repeats the
    epoch, as ``DistributedSampler`` does). ``max_batches`` (0 = all) caps the batches of a pass
    (``train.max_steps_per_epoch``).

    ``dtype`` is float32 or float16 (resolve ``cfg.output_dtype`` before calling). ``prescan``
    checks every file's signature and end marker first (about 20 us a file) so bad images are
    reported or skipped before training starts; None reads ``cfg.prescan``
    (default True). Without it, bad files are still handled when the decoders meet them.
    ``index``: the split's scan, when it was made already (`shared_split_indexes`); ``prescan``
    is then ignored.
    """
    return _build(
        cfg,
        "train",
        batch_size=cfg.batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        seed=seed,
        dtype=dtype,
        prescan=prescan,
        channels_last=channels_last,
        max_batches=max_batches,
        index=index,
    )


def build_val_loader(
    cfg: DataConfig,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float32,
    prescan: bool | None = None,
    channels_last: bool = True,
    index: SplitIndex | None = None,
) -> Loader:
    """The validation loader of ``rank``: resize, center crop; every image exactly once overall.

    Ranks read disjoint contiguous blocks that together cover the split without padding, so
    the last batch of a rank may be short and block sizes differ by at most one image (a rank
    may get none when there are fewer images than ranks); sum counts across ranks.
    ``dtype``, ``prescan``, ``channels_last`` and ``index`` as for `build_train_loader`.
    """
    return _build(
        cfg,
        "val",
        batch_size=cfg.val_batch_size or cfg.batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        seed=0,
        dtype=dtype,
        prescan=prescan,
        channels_last=channels_last,
        index=index,
    )
