"""Training and validation batches from an ImageFolder, through DALI or a torchvision DataLoader.

A run's data goes through three steps, each in its own module:

- setup (`fastkd.data.build`): `prepare_data_root` generates the synthetic quickstart set when
  asked; `shared_split_indexes` scans ``data.root`` (`fastkd.data.folder`) and pre-scans every
  file once per run, on rank 0, and hands the list to every rank (one process on each other
  node checks that its copy holds every file);
- a spec (`fastkd.data.spec`): a `LoaderSpec` binds the ``data`` config to a split, a rank and
  the run's device, dtype and memory format;
- a loader (`build_loader`): DALI (`fastkd.data.dali`; decoding on the GPU, "mixed", or the
  CPU) or the torchvision DataLoader (`fastkd.data.torch_loader`; also DALI's fallback, with one
  warning, when DALI cannot be imported). Both follow the `Loader` protocol and read the same
  list in the same per-rank order (`fastkd.data.sharding.ShardPlan`); building one has no side
  effect on the disk.

Bad images (``data.on_bad_image``): the pre-scan (signature, size, end marker) catches empty,
truncated and foreign files before the first step; what it misses is caught by the decoders.
``error`` raises one `DataError` naming the files; ``skip`` warns, leaves them out and keeps
training batches full.
"""

from __future__ import annotations

from fastkd.data.build import (
    build_loader,
    build_train_loader,
    build_val_loader,
    prepare_data_root,
    scan_splits,
    shared_split_indexes,
)
from fastkd.data.folder import SplitIndex
from fastkd.data.spec import Loader, LoaderSpec
from fastkd.errors import DataError

__all__ = [
    "DataError",
    "Loader",
    "LoaderSpec",
    "SplitIndex",
    "build_loader",
    "build_train_loader",
    "build_val_loader",
    "prepare_data_root",
    "scan_splits",
    "shared_split_indexes",
]
