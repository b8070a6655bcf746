"""Exact mid-epoch resume: a pass started at batch k is bitwise the tail of a whole pass.

A run resumed from a checkpoint written after k steps of epoch e calls
``set_epoch(e, start_batch=k)`` on fresh loaders; the batches it reads next must be the ones the
uninterrupted run read, for both backends, any worker count, any rank and with max_batches.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import _utils as torch_data_utils

from fastkd.data import build_train_loader, build_val_loader

CPU = torch.device("cpu")

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")

# (backend, data.workers): torch in the main process and with a worker process; DALI on the CPU.
BACKENDS = [
    pytest.param("torch", 0, id="torch-w0"),
    pytest.param("torch", 1, id="torch-w1"),
    pytest.param("dali", 1, marks=needs_dali, id="dali"),
]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _take(loader) -> Batches:
    """One pass as the trainer takes it (exactly ``pass_batches`` batches, cloned), checking
    that the loader has nothing more to give."""
    iterator = iter(loader)
    batches = [
        (x.clone(), y.clone()) for x, y in (next(iterator) for _ in range(loader.pass_batches))
    ]
    assert next(iterator, None) is None
    return batches


def _assert_same(got: Batches, expected: Batches) -> None:
    assert len(got) == len(expected)
    for (x, y), (x_ref, y_ref) in zip(got, expected, strict=True):
        assert torch.equal(y, y_ref)
        assert x.dtype == x_ref.dtype and torch.equal(x, x_ref)  # bitwise, not approximately


@pytest.mark.parametrize(("backend", "workers"), BACKENDS)
@pytest.mark.parametrize(
    ("rank", "world_size", "max_batches"),
    [(0, 1, 0), (1, 2, 0), (0, 1, 3)],
    ids=["one-rank", "rank1-of-2", "max-batches"],
)
def test_a_pass_started_mid_epoch_is_the_tail_of_a_whole_pass(
    make_data_config, backend, workers, rank, world_size, max_batches
):
    cfg = make_data_config(backend=backend, workers=workers, batch_size=3)
    build = partial(
        build_train_loader,
        cfg,
        device=CPU,
        seed=4,
        rank=rank,
        world_size=world_size,
        max_batches=max_batches,
    )
    whole = build()  # the uninterrupted run
    reference, positions = {}, {}
    for epoch in (1, 2):
        whole.set_epoch(epoch)
        positions[epoch] = whole.shard_indices()
        reference[epoch] = _take(whole)
    whole.close()
    n = len(whole)
    assert n == {(1, 0): 8, (2, 0): 4, (1, 3): 3}[world_size, max_batches]

    resumed = build()  # a resumed run: its first pass starts mid-epoch
    for k in sorted({1, n // 2, n - 1, n}):
        resumed.set_epoch(1, start_batch=k)
        assert len(resumed) == n and resumed.pass_batches == n - k  # len: the whole epoch
        assert np.array_equal(resumed.shard_indices(), positions[1])  # the whole epoch too
        _assert_same(_take(resumed), reference[1][k:])  # k == n: nothing
        resumed.set_epoch(2)  # the next epoch starts at its first batch again
        assert resumed.pass_batches == n
        _assert_same(_take(resumed), reference[2])
    if backend == "dali":
        assert resumed.builds == 1  # shorter (and empty) passes reuse the pipeline
    resumed.close()


@pytest.mark.parametrize(("backend", "workers"), BACKENDS)
def test_a_validation_pass_can_start_mid_shard(make_data_config, backend, workers):
    cfg = make_data_config(backend=backend, workers=workers, batch_size=3)
    loader = build_val_loader(cfg, device=CPU, rank=1, world_size=2)  # 10 images, last batch 1
    whole = _take(loader)
    assert [len(y) for _, y in whole] == [3, 3, 3, 1]
    loader.set_epoch(0, start_batch=2)
    _assert_same(_take(loader), whole[2:])
    loader.close()


@pytest.mark.parametrize(("backend", "workers"), BACKENDS[::2])
def test_start_batch_out_of_range_is_a_value_error(make_data_config, backend, workers):
    loader = build_train_loader(make_data_config(backend=backend, batch_size=3), device=CPU)
    loader.set_epoch(1, start_batch=np.int64(2))  # as read back from a checkpoint
    assert type(loader.start_batch) is int
    with pytest.raises(TypeError):
        loader.set_epoch(1, start_batch=2.0)
    for bad in (-1, len(loader) + 1):
        with pytest.raises(ValueError, match=rf"start_batch={bad} is not in \[0, 8\].*epoch 5"):
            loader.set_epoch(5, start_batch=bad)
    assert (loader.epoch, loader.start_batch) == (1, 2)  # a refused call changes nothing
    loader.close()


def test_torch_workers_survive_sigterm_and_sigint(make_data_config):
    """SLURM preemption and Ctrl-C signal every process of the job: the workers ignore them and
    the pass goes on to its last batch (the main process decides when to stop)."""
    cfg = make_data_config(backend="torch", batch_size=2, prefetch=1)
    reference = build_train_loader(cfg, device=CPU, seed=3)
    reference.set_epoch(1, start_batch=1)
    expected = _take(reference)
    loader = build_train_loader(
        make_data_config(backend="torch", batch_size=2, workers=1, prefetch=1), device=CPU, seed=3
    )
    loader.set_epoch(1, start_batch=1)
    iterator = iter(loader)
    batches = [next(iterator)]  # the worker is running (its worker_init_fn has run)
    (worker,) = loader._dataloader._iterator._workers
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker.pid, signum)
    time.sleep(0.2)  # a killed worker would have made the DataLoader raise by now
    assert worker.is_alive()
    batches += list(iterator)
    _assert_same([(x.clone(), y.clone()) for x, y in batches], expected)
    loader.close()
    assert not worker.is_alive()
    reference.close()


def test_torch_close_kills_a_worker_that_does_not_exit(make_data_config, monkeypatch):
    """PyTorch's last resort for a stuck worker is SIGTERM, which the workers ignore: close()
    kills it instead, so the process never waits for it."""
    cfg = make_data_config(backend="torch", batch_size=2, workers=1)
    loader = build_train_loader(cfg, device=CPU)
    next(iter(loader))
    (worker,) = loader._dataloader._iterator._workers
    os.kill(worker.pid, signal.SIGSTOP)  # stuck: it cannot take its stop message
    monkeypatch.setattr(torch_data_utils, "MP_STATUS_CHECK_INTERVAL", 0.05)  # the join timeout
    try:
        loader.close()
        assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
    finally:
        if worker.is_alive():  # never leave a stopped process behind (exit would wait for it)
            worker.kill()
            worker.join()


@pytest.fixture
def truncated_imagefolder(tiny_imagefolder, tmp_path) -> tuple[Path, Path]:
    """The tiny set plus a truncated JPEG in train/ (25 training files)."""
    root = tmp_path / "bad"
    shutil.copytree(tiny_imagefolder, root)
    train_class = sorted((root / "train").iterdir())[0]
    good = sorted(train_class.iterdir())[0].read_bytes()
    truncated = train_class / "truncated.JPEG"
    truncated.write_bytes(good[: len(good) // 2])
    return root, truncated


@pytest.mark.parametrize(("backend", "workers"), BACKENDS[::2])
def test_a_bad_image_met_mid_epoch_is_skipped_as_in_a_whole_pass(
    make_data_config, truncated_imagefolder, backend, workers
):
    """on_bad_image=skip in a pass started mid-epoch: the bad file met after the start gets the
    same replacement (next file, same sample seed) as in the uninterrupted pass."""
    root, truncated = truncated_imagefolder
    cfg = make_data_config(root=str(root), backend=backend, on_bad_image="skip", batch_size=5)
    build = partial(build_train_loader, cfg, device=CPU, seed=0, prescan=False)
    whole = build()  # 25 files, 5 batches of 5: every epoch reads the bad file
    bad_position = whole.index.files.index(str(truncated))
    epoch, bad_batch = next(
        (e, int(np.flatnonzero(whole.plan.indices(e) == bad_position)[0]) // 5)
        for e in range(50)
        if bad_position in whole.plan.indices(e)[10:]
    )
    whole.set_epoch(epoch)
    with pytest.warns(UserWarning, match="truncated.JPEG"):
        reference = _take(whole)
    whole.close()
    resumed = build()
    resumed.set_epoch(epoch, start_batch=bad_batch - 1)  # the decoder meets it after the start
    with pytest.warns(UserWarning, match="truncated.JPEG"):
        _assert_same(_take(resumed), reference[bad_batch - 1 :])
    if backend == "dali":
        assert resumed.builds == 2  # one failure, one rebuild that went on mid-pass
    resumed.close()
