"""Scanning data.root once per run and building the loaders of either backend from a spec.

`prepare_data_root` (generate the synthetic set when asked) and `shared_split_indexes` (scan and
pre-scan on rank 0, hand the list to every rank) are the data's setup steps, run once per run by
the trainer and ``fastkd.eval``. `build_loader` then turns a split's index and a `LoaderSpec`
into a loader and has no side effect on the disk: it never scans or writes. `build_train_loader`
and `build_val_loader` are the one-call forms for a single process (benchmarks, tests).
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from typing import Any

import torch

from fastkd.config import DataConfig
from fastkd.data.folder import SplitIndex, drop_bad_images, scan_split
from fastkd.data.spec import Loader, LoaderSpec
from fastkd.data.torch_loader import TorchLoader
from fastkd.distributed import DistInfo, broadcast_from_main, fail_together

log = logging.getLogger("fastkd")

_warned_no_dali = False


def prepare_data_root(cfg: DataConfig, dist: DistInfo) -> None:
    """Generate ``data.synthetic`` at ``data.root`` when enabled and missing (a collective).

    A setup step the trainer and ``fastkd.eval`` run before scanning: building a loader never
    generates or writes anything.

    Rank 0 generates first. Then one process per other node does the same for its node: on a
    filesystem every node shares it finds rank 0's set and does nothing, on a node's own disk it
    writes that node's copy (the same bytes). A failure anywhere stops every rank.
    """
    # Every rank takes part in both steps whatever its config says: a node whose overrides
    # differ must not leave the others waiting in a collective (`agree_on` names the difference
    # later). Imported here, not at the top: ``python -m fastkd.data.synthetic`` imports this package
    # first, and would otherwise find its own module already imported (runpy's warning).
    from fastkd.data.synthetic import prepare_synthetic

    with fail_together(dist, "generating the synthetic data set"):
        if cfg.synthetic.enabled and dist.is_main:
            prepare_synthetic(cfg)
    with fail_together(dist, "generating the synthetic data set on its node"):
        if cfg.synthetic.enabled and dist.local_rank == 0 and not dist.is_main:
            prepare_synthetic(cfg)


def scan_splits(
    cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), prescan: bool | None = None
) -> dict[str, SplitIndex]:
    """Scan (and, per ``prescan``, default ``cfg.prescan``, pre-scan) ``splits`` of ``cfg.root``."""
    prescan = cfg.prescan if prescan is None else prescan
    indexes = {split: scan_split(cfg.root, split) for split in splits}
    if not prescan:
        return indexes  # bad files are then met (and handled) by the decoders at run time
    return {split: drop_bad_images(index, cfg.on_bad_image) for split, index in indexes.items()}


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
    failure: Exception | None = None
    payload: Any = None
    if dist.is_main:
        start = time.perf_counter()
        try:
            scanned = scan_splits(cfg, splits)
            payload = {split: index.portable() for split, index in scanned.items()}
            counts = " + ".join(f"{len(index)} {split}" for split, index in scanned.items())
            prescanned = " and pre-scanned" if cfg.prescan else ""
            seconds = time.perf_counter() - start
            log.info(
                "data: %s images scanned%s in %.2fs (once, on rank 0)", counts, prescanned, seconds
            )
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
        indexes = {
            split: SplitIndex.from_portable(data, cfg.root) for split, data in payload.items()
        }
        if dist.local_rank == 0:  # one walk per node; its other ranks read the same disk
            for index in indexes.values():
                index.check_on_this_node()
    return indexes


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


def build_loader(index: SplitIndex, spec: LoaderSpec) -> Loader:
    """The loader of ``spec`` over ``index`` (that split's scan), from ``data.backend``.

    ``dali`` falls back to ``torch`` with one warning when DALI cannot be imported.
    """
    if spec.data.backend == "dali":
        dali_backend = _import_dali_backend()
        if dali_backend is not None:
            return dali_backend.DaliLoader(index, spec)
    return TorchLoader(index, spec)


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
) -> Loader:
    """The training loader of ``rank`` on a fresh scan of ``cfg.root``: random-resized crops,
    flips, fixed-shape batches.

    Every batch holds exactly ``cfg.batch_size`` images and every rank yields the same number of
    batches from a disjoint shard; the order and the crops and flips are a function of (``seed``,
    epoch) selected with ``loader.set_epoch(epoch)`` (without it, a second pass repeats the
    epoch, as ``DistributedSampler`` does); ``set_epoch(epoch, start_batch=k)`` starts the pass at
    batch k, bitwise as an uninterrupted pass goes on there (a mid-epoch resume). ``max_batches``
    (0 = all) caps the batches of a pass (``train.max_steps_per_epoch``). ``prescan`` (None:
    ``cfg.prescan``) checks every file's signature and end marker first (about 20 us a file) so
    bad images are reported or skipped before training starts; without it they are handled when
    the decoders meet them.
    """
    return _scanned_loader(
        LoaderSpec(
            cfg,
            "train",
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            rank=rank,
            world_size=world_size,
            seed=seed,
            max_batches=max_batches,
        ),
        prescan,
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
) -> Loader:
    """The validation loader of ``rank`` on a fresh scan: resize, center crop; every image once.

    Ranks read disjoint contiguous blocks that together cover the split without padding, so
    the last batch of a rank may be short and block sizes differ by at most one image (a rank
    may get none when there are fewer images than ranks); sum counts across ranks.
    ``dtype``, ``prescan`` and ``channels_last`` as for `build_train_loader`.
    """
    return _scanned_loader(
        LoaderSpec(
            cfg,
            "val",
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            rank=rank,
            world_size=world_size,
        ),
        prescan,
    )


def _scanned_loader(spec: LoaderSpec, prescan: bool | None) -> Loader:
    """`build_loader` on a fresh scan of the spec's split (one process: no sharing)."""
    return build_loader(scan_splits(spec.data, (spec.split,), prescan)[spec.split], spec)
