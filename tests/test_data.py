"""Data loading: the shared scan, both backends, sharding, seeding and bad-image handling."""

from __future__ import annotations

import gc
import shutil
import sys
import warnings
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fastkd.data.build as data_build
from fastkd.data import DataError, Loader, build_train_loader, build_val_loader
from fastkd.data.folder import find_bad_images, probe_image, scan_imagefolder
from fastkd.data.sharding import ShardPlan

CPU = torch.device("cpu")
BACKENDS = ["dali", "torch"]

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")


def _backend_param(backend: str):
    marks = [needs_dali] if backend == "dali" else []
    return pytest.param(backend, marks=marks, id=backend)


ALL_BACKENDS = [_backend_param(b) for b in BACKENDS]


def _epoch(loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All batches of one pass (images cloned: a backend may recycle its buffers) and labels."""
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    return images, torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)


def _denormalize(images: torch.Tensor, cfg) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return images.float() * std + mean


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------


def test_scan_matches_torchvision_imagefolder(tiny_imagefolder, tmp_path):
    root = _copy_tree(tiny_imagefolder, tmp_path / "root")
    some_class = sorted((root / "train").iterdir())[1]
    template = next(some_class.iterdir())
    # Mixed-case endings, PNG, a nested folder, and files that are not images.
    shutil.copy(template, some_class / "zz_upper.JPG")
    shutil.copy(template, some_class / "aa_lower.jpeg")
    Image.open(template).save(some_class / "png_image.PnG")
    (some_class / "nested").mkdir()
    shutil.copy(template, some_class / "nested" / "deep.jpg")
    (some_class / "notes.txt").write_text("not an image")
    (some_class / "archive.tar").write_bytes(b"\x00" * 10)

    index = scan_imagefolder(root)
    for split in ("train", "val"):
        reference = torchvision.datasets.ImageFolder(root / split)
        ours = getattr(index, split)
        assert list(ours.classes) == reference.classes
        assert list(zip(ours.files, ours.labels, strict=True)) == reference.samples
    assert (some_class / "nested" / "deep.jpg").as_posix() in index.train.files
    assert not any(f.endswith((".txt", ".tar")) for f in index.train.files)


def test_val_may_hold_a_subset_of_the_train_classes(tiny_imagefolder, tmp_path):
    root = _copy_tree(tiny_imagefolder, tmp_path / "root")
    classes = sorted(p.name for p in (root / "train").iterdir())
    shutil.rmtree(root / "val" / classes[0])  # val lacks class 0: labels keep train's numbering
    index = scan_imagefolder(root)
    assert index.num_classes == 4
    assert set(index.val.labels) == {1, 2, 3}
    assert index.val.files[0].startswith(str(root / "val" / classes[1]))


def _remove(path: Path) -> None:
    shutil.rmtree(path)


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("missing_root", "does not exist"),
        ("no_train", r"train is missing"),
        ("no_val", r"val is missing"),
        ("empty_class", "holds no images"),
        ("unknown_val_class", "not present in train/"),
        ("no_class_folders", "no class folders"),
    ],
)
def test_layout_errors_name_the_path(tiny_imagefolder, tmp_path, breakage, match):
    root = _copy_tree(tiny_imagefolder, tmp_path / "root")
    culprit = root
    if breakage == "missing_root":
        culprit = tmp_path / "nowhere"
        root = culprit
    elif breakage == "no_train":
        _remove(root / "train")
        culprit = root / "train"
    elif breakage == "no_val":
        _remove(root / "val")
        culprit = root / "val"
    elif breakage == "empty_class":
        culprit = next((root / "train").iterdir())
        for file in culprit.iterdir():
            file.unlink()
        (culprit / "readme.txt").write_text("images went elsewhere")
    elif breakage == "unknown_val_class":
        culprit = root / "val" / "zebra"
        culprit.mkdir()
        shutil.copy(next(next((root / "val").iterdir()).iterdir()), culprit / "z.JPEG")
    elif breakage == "no_class_folders":
        for class_dir in (root / "train").iterdir():
            _remove(class_dir)
        culprit = root / "train"
    with pytest.raises(DataError, match=match) as info:
        scan_imagefolder(root)
    message = str(info.value)
    assert str(culprit) in message or culprit.name in message
    assert "\n" not in message  # one clear line, no traceback-like dump


def test_num_classes_mismatch_is_an_error(tiny_imagefolder):
    with pytest.raises(DataError, match="4 class folders but 5 classes"):
        scan_imagefolder(tiny_imagefolder, num_classes=5)
    assert scan_imagefolder(tiny_imagefolder, num_classes=4).num_classes == 4


def test_loader_errors_are_data_errors(make_data_config, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_train_loader(make_data_config(root=str(tmp_path / "absent")), device=CPU)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_train_loader(make_data_config(batch_size=13), device=CPU, world_size=2)


# ---------------------------------------------------------------------------------------------
# Sharding plan (backend independent)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("num_samples", [11, 24, 101])
def test_train_plan_shards_are_disjoint_equal_and_full(num_samples, world_size):
    batch_size = 2
    plans = [
        ShardPlan(
            num_samples, train=True, batch_size=batch_size, rank=r, world_size=world_size, seed=3
        )
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        shards = [plan.indices(epoch) for plan in plans]
        together = np.concatenate(shards)
        assert len(set(together.tolist())) == len(together)  # disjoint, no duplicates
        assert {len(s) for s in shards} == {plans[0].num_samples}
        assert plans[0].num_samples % batch_size == 0
        assert {p.num_batches for p in plans} == {plans[0].num_batches}
        assert all(len(b) == batch_size for p in plans for b in p.batches(epoch))
        # at most world_size * batch_size - 1 samples sit out an epoch
        assert num_samples - len(together) < world_size * batch_size
    assert not np.array_equal(plans[0].indices(0), plans[0].indices(1))
    again = ShardPlan(
        num_samples, train=True, batch_size=batch_size, rank=0, world_size=world_size, seed=3
    )
    assert np.array_equal(again.indices(1), plans[0].indices(1))
    assert np.array_equal(again.sample_seeds(1), plans[0].sample_seeds(1))


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("num_samples", [1, 5, 20, 23])
def test_val_plan_covers_every_sample_once(num_samples, world_size):
    plans = [
        ShardPlan(num_samples, train=False, batch_size=3, rank=r, world_size=world_size, seed=0)
        for r in range(world_size)
    ]
    together = np.concatenate([plan.indices(0) for plan in plans])
    assert sorted(together.tolist()) == list(range(num_samples))
    assert sum(p.num_samples for p in plans) == num_samples
    for plan in plans:
        assert sum(len(b) for b in plan.batches(0)) == plan.num_samples
        assert len(plan.batches(0)) == plan.num_batches


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_train_batches_have_a_fixed_shape_over_two_epochs(make_data_config, backend, dtype):
    cfg = make_data_config(backend=backend, batch_size=5)
    loader = build_train_loader(cfg, device=CPU, seed=7, dtype=dtype)
    assert loader.backend == ("dali-cpu" if backend == "dali" else "torch")
    assert (len(loader), loader.num_samples, loader.batch_size) == (4, 20, 5)
    assert loader.num_classes == 4 and len(loader.classes) == 4
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = 0
        labels = []
        for images, batch_labels in loader:
            batches += 1
            assert images.shape == (5, 3, 56, 56)
            assert images.dtype == dtype and images.device == CPU
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert not images.is_contiguous()  # really NHWC memory, not a 3-channel NCHW copy
            assert batch_labels.dtype == torch.int64 and batch_labels.shape == (5,)
            assert torch.isfinite(images.float()).all()
            labels.append(batch_labels)
        assert batches == len(loader)
        orders.append(torch.cat(labels))
        index = loader.index
        expected = torch.tensor([index.labels[i] for i in loader.shard_indices()])
        assert torch.equal(orders[-1], expected)  # the batches follow the plan, in order
    assert not np.array_equal(
        (loader.set_epoch(0), loader.shard_indices())[1],
        (loader.set_epoch(1), loader.shard_indices())[1],
    )
    # Same seed, new loader: the same order; another seed: another order.
    same = build_train_loader(cfg, device=CPU, seed=7, dtype=dtype)
    same.set_epoch(1)
    assert torch.equal(_epoch(same)[1], orders[1])
    other = build_train_loader(cfg, device=CPU, seed=8, dtype=dtype)
    other.set_epoch(1)
    assert not np.array_equal(other.shard_indices(), same.shard_indices())
    for each in (loader, same, other):
        each.close()


@needs_dali
def test_dali_and_torch_read_the_same_training_order(make_data_config):
    labels = {}
    for backend in BACKENDS:
        loader = build_train_loader(make_data_config(backend=backend), device=CPU, seed=3)
        loader.set_epoch(2)
        labels[backend] = _epoch(loader)[1]
        loader.close()
    assert torch.equal(labels["dali"], labels["torch"])


@needs_dali
def test_dali_batches_are_channels_last_views_of_hwc_output(make_data_config):
    loader = build_train_loader(make_data_config(backend="dali"), device=CPU)
    images, _ = next(iter(loader))
    hwc = images._base  # what DALI produced; the batch is a permuted view of it
    assert hwc is not None and hwc.shape == (4, 56, 56, 3) and hwc.is_contiguous()
    assert images.data_ptr() == hwc.data_ptr()
    assert torch.equal(images.permute(0, 2, 3, 1), hwc)
    loader.close()


@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_gpu_pipeline_is_well_formed_without_a_gpu(make_data_config, split):
    """The GPU ("mixed") pipeline definition, checked where no GPU exists.

    DALI validates operator names, argument names and types, and where each node runs when the
    graph is defined, before any device is touched; only building it needs the GPU.
    """
    from nvidia.dali import types

    from fastkd.data.dali import _PlanSource

    build = build_train_loader if split == "train" else build_val_loader
    cfg = make_data_config(backend="dali", dali={"hw_decoder_load": 0.5}, prefetch=3, workers=3)
    loader = build(cfg, device=torch.device("cuda", 1), dtype=torch.float16)
    assert loader.backend == "dali-gpu"
    assert loader._runtime_kwargs == dict(
        batch_size=4, num_threads=3, device_id=1, prefetch_queue_depth=3, seed=0
    )
    decoder_args = loader._pipeline_kwargs["decoder_args"]
    assert loader._pipeline_kwargs["decoder_device"] == "mixed"
    assert loader._pipeline_kwargs["out_dtype"] == types.FLOAT16
    assert decoder_args["hw_decoder_load"] == 0.5
    if split == "train":  # nvJPEG's buffers sized for ImageNet: the training decoder only
        assert decoder_args["preallocate_width_hint"] > 0
        assert decoder_args["device_memory_padding"] > 0
        assert "jpeg_fancy_upsampling" not in decoder_args
    else:  # validation decodes as libjpeg/PIL does, and preallocates nothing
        assert decoder_args == {"hw_decoder_load": 0.5, "jpeg_fancy_upsampling": True}
    crop_area = loader._crop_area
    pipe = loader._make_pipeline(_PlanSource(loader.index.files, loader.index.labels, crop_area))
    pipe._build_graph()
    assert [node.device for node in pipe._graph_out] == ["gpu", "gpu"]  # images and labels

    from fastkd.data.dali import decoder_padding_bytes

    gpu_bytes, pinned_bytes = decoder_padding_bytes(8)  # what the README's memory note says
    assert round(gpu_bytes / 2**30, 2) == 1.57 and round(pinned_bytes / 2**30, 2) == 2.09
    plain = build(
        make_data_config(backend="dali", dali={"preallocate": False}),
        device=torch.device("cuda", 0),
    )
    assert set(plain._pipeline_kwargs["decoder_args"]) == (
        {"hw_decoder_load"} if split == "train" else {"hw_decoder_load", "jpeg_fancy_upsampling"}
    )
    on_cpu = build(
        make_data_config(backend="dali", dali={"device": "cpu"}), device=torch.device("cuda", 0)
    )
    assert on_cpu.backend == "dali-cpu" and on_cpu._runtime_kwargs["device_id"] is None
    assert on_cpu._pipeline_kwargs["decoder_args"] == {}
    with pytest.raises(DataError, match=r"data\.dali\.device=gpu needs a CUDA device"):
        build(make_data_config(backend="dali", dali={"device": "gpu"}), device=CPU)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_training_images_are_normalized_random_crops(make_data_config, backend):
    cfg = make_data_config(backend=backend, batch_size=8)
    loader = build_train_loader(cfg, device=CPU, seed=0)
    images, _ = _epoch(loader)
    stacked = torch.cat(images).float()
    pixels = _denormalize(stacked, cfg)
    assert pixels.min() >= -1.0 and pixels.max() <= 256.0  # normalized from the 0-255 scale
    assert stacked.mean(dim=(0, 2, 3)).abs().max() < 1.0  # roughly centred by the mean
    # Augmentation is a function of (seed, epoch, sample) in both backends: a second pass over
    # the same epoch repeats its crops and flips exactly.
    again, _ = _epoch(loader)
    assert torch.equal(torch.cat(again), torch.cat(images))
    loader.close()


def _varied_imagefolder(root: Path) -> Path:
    """Smooth JPEGs of assorted sizes and aspect ratios (odd margins for the center crop)."""
    # (73, 56) and (56, 81): margins 25 and 33 around the 48 px crop, where half-to-even and
    # half-up rounding of the offset disagree.
    sizes = [(101, 75), (75, 101), (333, 250), (99, 100), (73, 56), (56, 81), (257, 130), (90, 71)]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for class_index in range(2):
            folder = root / split / f"class{class_index}"
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                phase = rng.uniform(0, 6.28, size=3)
                pixels = np.stack(
                    [
                        127 + 100 * np.sin(xx / (9 + 4 * c) + yy / (13 + 3 * c) + phase[c])
                        for c in range(3)
                    ],
                    axis=-1,
                )
                # A hard edge too: misplaced crops or resizes show up as large differences.
                pixels[h // 3 : h // 2, w // 4 : w // 2] = (250, 20, 20)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    folder / f"{i}.JPEG", quality=95
                )
    return root


@needs_dali
def test_dali_validation_matches_torchvision(make_data_config, tmp_path):
    """DALI's val transform reproduces torchvision's Resize + CenterCrop geometry.

    Tolerance, on the 0-255 scale: at most 2 levels for any pixel and 0.5 on average per image.
    The two antialiased bilinear resizers round to uint8 differently (1 level, measured), and
    the two libjpeg-turbo builds could pick other IDCT paths (another level at most). A crop or
    resize misplaced by one pixel costs more than 3 on average on these images, which the end
    of the test checks.
    """
    root = _varied_imagefolder(tmp_path / "varied")
    cfg = make_data_config(root=str(root), image_size=48, val_resize=56, batch_size=3)
    outputs = {}
    for backend in BACKENDS:
        loader = build_val_loader(
            make_data_config(
                root=str(root), image_size=48, val_resize=56, batch_size=3, backend=backend
            ),
            device=CPU,
        )
        images, labels = _epoch(loader)
        outputs[backend] = (_denormalize(torch.cat(images), cfg), labels)
        assert loader.num_samples == 16 and len(loader) == 6
        loader.close()
    dali_pixels, dali_labels = outputs["dali"]
    torch_pixels, torch_labels = outputs["torch"]
    assert torch.equal(dali_labels, torch_labels)
    assert dali_pixels.shape == torch_pixels.shape == (16, 3, 48, 48)
    difference = (dali_pixels - torch_pixels).abs()
    per_image_mean = difference.mean(dim=(1, 2, 3))
    assert per_image_mean.max() < 0.5, per_image_mean
    assert difference.max() <= 2.0 + 1e-3
    # The comparison is sharp enough to see a one-pixel shift of the crop.
    shifted = (dali_pixels[..., 1:] - torch_pixels[..., :-1]).abs().mean(dim=(1, 2, 3))
    assert shifted.min() > 3.0, shifted


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_counts_every_image_once_across_ranks(make_data_config, backend, world_size):
    cfg = make_data_config(backend=backend, batch_size=3)  # 20 images: 3 does not divide them
    reference = build_val_loader(cfg, device=CPU)
    ref_images, ref_labels = _epoch(reference)
    reference.close()
    fingerprints = Counter(_fingerprints(torch.cat(ref_images)))
    assert len(ref_labels) == 20 and len(fingerprints) == 20  # the fingerprint tells images apart

    seen_positions, seen_fingerprints, total = [], Counter(), 0
    for rank in range(world_size):
        loader = build_val_loader(cfg, device=CPU, rank=rank, world_size=world_size)
        images, labels = _epoch(loader)
        assert len(labels) == loader.num_samples
        assert len(images) == len(loader)
        assert all(len(b) == 3 for b in images[:-1]) and 1 <= len(images[-1]) <= 3
        positions = loader.shard_indices().tolist()
        assert labels.tolist() == [loader.index.labels[p] for p in positions]
        seen_positions += positions
        seen_fingerprints.update(_fingerprints(torch.cat(images)))
        total += len(labels)
        loader.close()
    assert total == 20
    assert sorted(seen_positions) == list(range(20))
    assert seen_fingerprints == fingerprints


def _fingerprints(images: torch.Tensor) -> list[tuple[float, ...]]:
    """A per-image signature that survives being batched differently."""
    means = images.float().mean(dim=(2, 3))
    spreads = images.float().std(dim=(2, 3))
    return [
        tuple(round(v, 3) for v in torch.cat([m, s]).tolist())
        for m, s in zip(means, spreads, strict=True)
    ]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_train_shards_across_ranks_are_disjoint_with_equal_steps(make_data_config, backend):
    cfg = make_data_config(backend=backend, batch_size=3)
    for world_size in (2, 3):
        loaders = [
            build_train_loader(cfg, device=CPU, rank=r, world_size=world_size, seed=5)
            for r in range(world_size)
        ]
        assert len({len(loader) for loader in loaders}) == 1
        shards = [set(loader.shard_indices().tolist()) for loader in loaders]
        assert sum(len(s) for s in shards) == len(set().union(*shards))
        for loader in loaders:
            _, labels = _epoch(loader)
            assert len(labels) == len(loader) * 3
            loader.close()


def test_torch_loader_with_worker_processes_reshuffles_per_epoch(make_data_config):
    cfg = make_data_config(backend="torch", workers=2, batch_size=6, prefetch=2)
    loader = build_train_loader(cfg, device=CPU, seed=1)
    loader.set_epoch(0)
    first = _epoch(loader)
    loader.set_epoch(1)
    second = _epoch(loader)
    loader.set_epoch(0)
    first_again = _epoch(loader)  # persistent workers, same epoch: same order and same crops
    assert not torch.equal(first[1], second[1])
    assert torch.equal(first[1], first_again[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0], first_again[0], strict=True))
    # Augmentation does not depend on the worker count.
    single = build_train_loader(
        make_data_config(backend="torch", workers=0, batch_size=6), device=CPU, seed=1
    )
    assert all(torch.equal(a, b) for a, b in zip(first[0], _epoch(single)[0], strict=True))
    loader.close()


@needs_dali
def test_dali_pass_broken_off_early_restarts_cleanly(make_data_config):
    loader = build_train_loader(make_data_config(backend="dali", batch_size=2), device=CPU, seed=2)
    loader.set_epoch(0)
    for step, _ in enumerate(loader):
        if step == 1:
            break  # e.g. train.max_steps_per_epoch
    loader.set_epoch(1)
    labels = _epoch(loader)[1]
    expected = [loader.index.labels[p] for p in loader.shard_indices()]
    assert labels.tolist() == expected  # no stale batches of epoch 0 in epoch 1
    loader.close()


def _trainer_epochs(loader, epochs) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """What the trainer does: per epoch, set_epoch then take exactly len(loader) batches."""
    passes = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        iterator = iter(loader)
        batches = [next(iterator) for _ in range(len(loader))]
        passes.append(([x.clone() for x, _ in batches], torch.cat([y for _, y in batches])))
    return passes


@needs_dali
@pytest.mark.parametrize("max_batches", [0, 2])
def test_dali_builds_its_pipeline_once_per_run(make_data_config, max_batches):
    """A consumer that takes exactly len(loader) batches per epoch (the trainer) reuses one
    pipeline for every epoch; with max_batches the loader plans only those batches."""
    cfg = make_data_config(backend="dali", batch_size=3)
    loader = build_train_loader(cfg, device=CPU, seed=0, max_batches=max_batches)
    assert len(loader) == (max_batches or 8) and loader.num_samples == 3 * len(loader)
    passes = _trainer_epochs(loader, range(4))
    assert loader.builds == 1
    for epoch, (_, labels) in enumerate(passes):
        loader.set_epoch(epoch)
        assert labels.tolist() == [loader.index.labels[p] for p in loader.shard_indices()]
    val = build_val_loader(cfg, device=CPU)
    for _ in range(3):
        assert len(_epoch(val)[1]) == 20
    assert val.builds == 1
    loader.close()
    val.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_max_batches_serves_the_first_batches_of_each_shard(make_data_config, backend):
    cfg = make_data_config(backend=backend, batch_size=2)
    full = [build_train_loader(cfg, device=CPU, seed=5, rank=r, world_size=2) for r in range(2)]
    capped = [
        build_train_loader(cfg, device=CPU, seed=5, rank=r, world_size=2, max_batches=3)
        for r in range(2)
    ]
    for whole, cut in zip(full, capped, strict=True):
        whole.set_epoch(1)
        cut.set_epoch(1)
        assert len(cut) == 3 and cut.num_samples == 6
        assert np.array_equal(cut.shard_indices(), whole.shard_indices()[:6])
        images, labels = _epoch(cut)
        assert len(images) == 3 and len(labels) == 6
        # The same crops as the uncapped loader's first batches: the cap only shortens the pass.
        first = _epoch(whole)[0][:3]
        assert all(torch.equal(a, b) for a, b in zip(images, first, strict=True))
    for each in full + capped:
        each.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_augmentation_depends_on_seed_and_epoch_only(make_data_config, backend):
    """Each epoch has its own order, crops and flips; a resumed run (a new loader that starts at
    epoch 2) gets exactly the uninterrupted run's epoch 2, for any thread count."""
    cfg = make_data_config(backend=backend, batch_size=4)
    loader = build_train_loader(cfg, device=CPU, seed=11)
    passes = _trainer_epochs(loader, range(3))
    loader.close()
    resumed = build_train_loader(
        make_data_config(backend=backend, batch_size=4, workers=2), device=CPU, seed=11
    )
    ((images, labels),) = _trainer_epochs(resumed, [2])
    assert torch.equal(labels, passes[2][1])
    assert all(torch.equal(a, b) for a, b in zip(images, passes[2][0], strict=True))
    resumed.close()
    # Epochs differ in order, and the same image is cropped differently from one epoch to the
    # next: compare image by image, matched by file position.
    crops = {}
    for epoch, (images, _) in enumerate(passes):
        loader.set_epoch(epoch)
        crops[epoch] = dict(zip(loader.shard_indices().tolist(), torch.cat(images), strict=True))
    orders = [list(crops[e]) for e in range(3)]
    assert orders[0] != orders[1] != orders[2]
    shared = set(crops[0]) & set(crops[1])
    assert shared and all(not torch.equal(crops[0][p], crops[1][p]) for p in shared)
    other_seed = build_train_loader(cfg, device=CPU, seed=12)
    other_seed.set_epoch(0)
    other = dict(
        zip(other_seed.shard_indices().tolist(), torch.cat(_epoch(other_seed)[0]), strict=True)
    )
    assert all(not torch.equal(other[p], crops[0][p]) for p in set(other) & set(crops[0]))
    other_seed.close()


def test_torch_crops_follow_the_documented_sample_seeds(make_data_config):
    """A torch-backend sample is torchvision's transform under its plan seed, (seed, epoch,
    position) -> train_sample_seeds, applied to the decoded file: nothing else feeds it."""
    from fastkd.data.torch_loader import train_transform

    cfg = make_data_config(backend="torch", batch_size=4)
    loader = build_train_loader(cfg, device=CPU, seed=9)
    loader.set_epoch(3)
    images, _ = _epoch(loader)
    positions, seeds = loader.shard_indices(), loader.plan.sample_seeds(3)
    transform = train_transform(cfg.image_size, tuple(cfg.crop_area))
    for row in (0, 5, len(positions) - 1):
        torch.manual_seed(int(seeds[row]))
        with Image.open(loader.index.files[positions[row]]) as image:
            expected = np.asarray(transform(image.convert("RGB")), dtype=np.float32)
        pixels = _denormalize(torch.cat(images)[row : row + 1], cfg)[0].permute(1, 2, 0)
        assert np.abs(pixels.numpy() - expected).max() < 1e-3
    loader.close()


@needs_dali
def test_dali_crops_follow_the_documented_sample_seeds(make_data_config):
    """The DALI pipeline's crop and flip inputs are `crop_draws` of the plan's sample seeds."""
    from fastkd.data.dali import _UNIFORMS_PER_SAMPLE, _PlanSource, crop_draws
    from fastkd.data.sharding import sample_uniforms

    cfg = make_data_config(backend="dali", batch_size=4)
    loader = build_train_loader(cfg, device=CPU, seed=9)
    loader.set_epoch(3)
    source = _PlanSource(loader.index.files, loader.index.labels, loader._crop_area)
    source.set_batches(loader._planned_batches())
    for batch, (positions, seeds) in zip(source, loader._planned_batches(), strict=True):
        assert np.array_equal(seeds, loader.plan.seed_batches(3)[len(source.emitted) - 1])
        draws = crop_draws(sample_uniforms(seeds, _UNIFORMS_PER_SAMPLE), tuple(cfg.crop_area))
        keys = ("area_x_ratio", "area_per_ratio", "position", "flip")
        for got, key in zip(batch[2:], keys, strict=True):
            assert np.array_equal(got, draws[key])
        assert np.array_equal(batch[1], np.asarray(loader.index.labels)[positions])
    assert len(source.emitted) == len(loader)
    loader.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_follow_the_channels_last_setting(make_data_config, backend, split):
    """train.channels_last=false feeds contiguous NCHW batches (the same values), so an NCHW
    run and the NCHW benchmark baseline really run NCHW convolutions."""
    build = build_train_loader if split == "train" else build_val_loader
    cfg = make_data_config(backend=backend)
    by_layout = {}
    for channels_last in (True, False):
        loader = build(cfg, device=CPU, channels_last=channels_last)
        images, labels = _epoch(loader)
        loader.close()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert all(x.is_contiguous(memory_format=layout) for x in images)
        assert all(x.is_contiguous() != channels_last for x in images)
        by_layout[channels_last] = torch.cat(images), labels
    assert torch.equal(by_layout[True][1], by_layout[False][1])
    assert torch.equal(by_layout[True][0], by_layout[False][0])


def test_sample_uniforms_are_a_pure_function_of_each_seed():
    from fastkd.data.sharding import sample_uniforms

    seeds = np.random.default_rng(0).integers(0, 2**63 - 1, size=4000, dtype=np.int64)
    values = sample_uniforms(seeds, 23)
    assert values.shape == (4000, 23) and values.dtype == np.float32
    assert values.min() >= 0.0 and values.max() < 1.0
    assert np.array_equal(sample_uniforms(seeds[7:9], 23), values[7:9])  # batch-independent
    assert np.array_equal(sample_uniforms(seeds[:5], 3), values[:5, :3])
    # Uniform enough for augmentation: every decile of every column within 20% of its share.
    counts = np.stack([np.histogram(values[:, c], bins=10, range=(0, 1))[0] for c in range(23)])
    assert np.abs(counts / 400 - 1).max() < 0.2
    assert abs(np.corrcoef(values[:, 0], values[:, 1])[0, 1]) < 0.05


def _reference_window(height, width, area, ratio, position):
    """torchvision's RandomResizedCrop rule in relative coordinates (the first fitting draw,
    else the whole image at the nearest allowed aspect ratio, centred)."""
    aspect = width / height
    for a, r in zip(area, ratio, strict=True):
        w, h = np.sqrt(a * r / aspect), np.sqrt(a * aspect / r)
        if w <= 1 and h <= 1:
            return (1 - w) * position[0], (1 - h) * position[1], w, h
    w, h = min(1.0, (4 / 3) / aspect), min(1.0, aspect / (3 / 4))
    return (1 - w) / 2, (1 - h) / 2, w, h


@needs_dali
def test_dali_crop_window_follows_the_random_resized_crop_rule(tmp_path):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from fastkd.data.dali import CROP_ATTEMPTS, crop_draws, crop_window
    from fastkd.data.sharding import sample_uniforms

    # Tall, wide, square and extreme shapes: the extremes force the centre-crop fallback.
    shapes = [(375, 500), (500, 375), (300, 300), (40, 400), (400, 40), (64, 80)] * 4
    files = []
    for i, (h, w) in enumerate(shapes):
        files.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (w, h), (i * 9 % 256, 80, 160)).save(files[-1])
    draws = crop_draws(sample_uniforms(np.arange(len(files), dtype=np.int64), 23), (0.08, 1.0))
    # The draws as torchvision makes them: area fraction and aspect ratio of each attempt.
    area = np.sqrt(draws["area_x_ratio"] * draws["area_per_ratio"])
    ratio = np.sqrt(draws["area_x_ratio"] / draws["area_per_ratio"])
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    area[:4] = 0.99  # first rows: no draw fits a non-square image (fallback)
    draws["area_x_ratio"], draws["area_per_ratio"] = area * ratio, area / ratio
    encoded = [np.fromfile(f, dtype=np.uint8) for f in files]

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def windows():
        data, area_x_ratio, area_per_ratio, position = fn.external_source(
            source=lambda: (
                encoded,
                draws["area_x_ratio"],
                draws["area_per_ratio"],
                draws["position"],
            ),
            num_outputs=4,
            batch=True,
            dtype=[types.UINT8] + [types.FLOAT] * 3,
        )
        return crop_window(data, area_x_ratio, area_per_ratio, position)

    pipe = windows()
    pipe.build()
    anchors, sizes = (np.array(out.as_tensor()) for out in pipe.run())
    fallbacks = 0
    for i, (h, w) in enumerate(shapes):
        x, y, cw, ch = _reference_window(h, w, area[i], ratio[i], draws["position"][i])
        assert np.allclose([*anchors[i], *sizes[i]], [x, y, cw, ch], atol=1e-5), (i, h, w)
        fallbacks += bool(np.isclose(x, (1 - cw) / 2) and np.isclose(y, (1 - ch) / 2))
        window_area, window_aspect = cw * ch, (cw * w) / (ch * h)
        assert x >= 0 and x + cw <= 1 + 1e-6 and y >= 0 and y + ch <= 1 + 1e-6
        assert 3 / 4 - 1e-4 <= window_aspect <= 4 / 3 + 1e-4 or cw == 1 or ch == 1
        assert window_area >= 0.08 - 1e-6
    assert fallbacks >= 3 and CROP_ATTEMPTS == 10


def test_fallback_to_torch_warns_once_when_dali_is_missing(make_data_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # "import nvidia.dali" now fails
    monkeypatch.delitem(sys.modules, "fastkd.data.dali", raising=False)
    monkeypatch.setattr(data_build, "_warned_no_dali", False)
    cfg = make_data_config(backend="dali")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = build_train_loader(cfg, device=CPU)
        val = build_val_loader(cfg, device=CPU)
    assert train.backend == "torch" and val.backend == "torch"
    relevant = [w for w in caught if "DALI" in str(w.message)]
    assert len(relevant) == 1
    assert "data.backend=torch" in str(relevant[0].message)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 56, 56)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_dropped_loader_is_freed_at_once(make_data_config, backend):
    """No reference cycle keeps a loader (and its workers) alive until a garbage collection.

    Such a cycle was collected at a random later moment, sometimes inside a forked worker of
    another loader, which then tried to shut down workers that were not its own children.
    """
    loader = build_train_loader(make_data_config(backend=backend), device=CPU)
    next(iter(loader))
    reference = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert reference() is None
    finally:
        gc.enable()


def test_loaders_follow_the_protocol(make_data_config):
    loader = build_val_loader(make_data_config(backend="torch"), device=CPU)
    assert isinstance(loader, Loader)


# ---------------------------------------------------------------------------------------------
# Bad images
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bad_imagefolder(tiny_imagefolder, tmp_path) -> tuple[Path, list[Path]]:
    """The tiny set plus a truncated JPEG (train) and a text file named .JPEG (val)."""
    root = _copy_tree(tiny_imagefolder, tmp_path / "bad")
    train_class = sorted((root / "train").iterdir())[0]
    good = sorted(train_class.iterdir())[0].read_bytes()
    truncated = train_class / "truncated.JPEG"
    truncated.write_bytes(good[: len(good) // 2])
    val_class = sorted((root / "val").iterdir())[1]
    not_an_image = val_class / "page.JPEG"
    not_an_image.write_text("<html>404 not found</html>")
    return root, [truncated, not_an_image]


def test_probe_flags_truncated_empty_and_foreign_files(bad_imagefolder, tmp_path):
    root, (truncated, not_an_image) = bad_imagefolder
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    assert "cannot be decoded" in probe_image(str(truncated))
    assert "not an image" in probe_image(str(not_an_image))
    assert "empty" in probe_image(str(empty))
    good = next((root / "train").rglob("*_00000.JPEG"))
    assert probe_image(str(good)) is None
    padded = tmp_path / "padded.JPEG"  # bytes after the end marker: still a good image
    padded.write_bytes(good.read_bytes() + b"\x00" * 200)
    assert probe_image(str(padded)) is None
    files = [str(good), str(truncated), str(padded), str(empty)]
    assert sorted(find_bad_images(files)) == [1, 3]
    assert "cannot be read" in probe_image(str(tmp_path / "gone.JPEG"))
    assert "cannot be read" in probe_image(str(tmp_path))  # a folder named like an image
    # Past the first (timed) chunk of 512, in one thread or several: the same positions.
    many = [str(good)] * 1500
    many[700], many[1499], many[3] = str(truncated), str(empty), str(tmp_path / "gone.JPEG")
    for threads in (None, 1, 4):
        found = find_bad_images(many, threads=threads)
        assert sorted(found) == [3, 700, 1499], threads
        assert "empty" in found[1499] and "cannot be decoded" in found[700]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_images_stop_the_run_by_default(make_data_config, bad_imagefolder, backend):
    root, bad_files = bad_imagefolder
    cfg = make_data_config(root=str(root), backend=backend)
    with pytest.raises(DataError) as info:
        build_train_loader(cfg, device=CPU)
    assert str(bad_files[0]) in str(info.value) and "on_bad_image=skip" in str(info.value)
    with pytest.raises(DataError, match="page.JPEG"):
        build_val_loader(cfg, device=CPU)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_images_are_skipped_with_a_warning(make_data_config, bad_imagefolder, backend):
    root, bad_files = bad_imagefolder
    cfg = make_data_config(root=str(root), backend=backend, on_bad_image="skip", batch_size=5)
    with pytest.warns(UserWarning, match="truncated.JPEG"):
        train = build_train_loader(cfg, device=CPU)
    assert str(bad_files[0]) not in train.index.files and len(train.index) == 24
    _, labels = _epoch(train)
    assert len(labels) == train.num_samples == 20
    with pytest.warns(UserWarning, match="page.JPEG"):
        val = build_val_loader(cfg, device=CPU)
    assert len(_epoch(val)[1]) == val.num_samples == 20
    train.close()
    val.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", ["truncated", "not_an_image"])
def test_bad_image_met_at_run_time_raises_one_clear_error(
    make_data_config, bad_imagefolder, backend, bad
):
    root, bad_files = bad_imagefolder
    culprit = bad_files[0] if bad == "truncated" else bad_files[1]
    split_builder = build_train_loader if bad == "truncated" else build_val_loader
    workers = 2 if backend == "torch" else 1  # torch: the error crosses a worker process
    cfg = make_data_config(root=str(root), backend=backend, workers=workers)
    loader = split_builder(cfg, device=CPU, prescan=False)  # the decoders meet the bad file
    with pytest.raises(DataError) as info:
        _epoch(loader)
    message = str(info.value)
    assert str(culprit) in message
    assert "on_bad_image=skip" in message and "Traceback" not in message
    loader.close()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_image_met_at_run_time_is_skipped(make_data_config, bad_imagefolder, backend):
    root, bad_files = bad_imagefolder
    cfg = make_data_config(root=str(root), backend=backend, on_bad_image="skip", batch_size=5)
    train = build_train_loader(cfg, device=CPU, seed=0, prescan=False)
    assert str(bad_files[0]) in train.index.files  # no pre-scan: the decoders meet it
    # Pick an epoch whose shard includes the truncated file, so the decoder must meet it.
    bad_position = train.index.files.index(str(bad_files[0]))
    epoch = next(
        e for e in range(50) if (train.set_epoch(e), bad_position in train.shard_indices())[1]
    )
    train.set_epoch(epoch)
    with pytest.warns(UserWarning, match="truncated.JPEG"):
        images, labels = _epoch(train)
    assert [len(b) for b in images] == [5] * len(train)  # fixed batch shape kept
    assert len(labels) == train.num_samples
    train.close()

    val = build_val_loader(cfg, device=CPU, prescan=False)
    with pytest.warns(UserWarning, match="page.JPEG"):
        _, labels = _epoch(val)
    assert len(labels) == 20  # 21 files, the bad one left out
    val.close()


@needs_dali
def test_dali_skips_several_bad_images_met_in_one_pass(make_data_config, bad_imagefolder):
    root, bad_files = bad_imagefolder
    second = sorted((root / "train").iterdir())[2] / "also_truncated.JPEG"
    second.write_bytes(bad_files[0].read_bytes()[:300])
    cfg = make_data_config(root=str(root), backend="dali", on_bad_image="skip", batch_size=2)
    train = build_train_loader(cfg, device=CPU, seed=0, prescan=False)
    bad_positions = {train.index.files.index(str(path)) for path in (bad_files[0], second)}
    epoch = next(
        e
        for e in range(200)
        if (train.set_epoch(e), bad_positions <= set(train.shard_indices()))[1]
    )
    train.set_epoch(epoch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, labels = _epoch(train)
    named = " ".join(str(w.message) for w in caught)
    assert "truncated.JPEG" in named and "also_truncated.JPEG" in named
    assert [len(b) for b in images] == [2] * len(train) and len(labels) == train.num_samples
    # The next pass knows both files: no failure, no rebuild.
    builds = train.builds
    assert builds == 3  # two failures, two rebuilds: the second one resumed a resumed pass
    train.set_epoch(epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(_epoch(train)[1]) == train.num_samples
    assert train.builds == builds
    train.close()


def test_building_a_loader_never_writes(make_data_config, tmp_path):
    """Generating the synthetic set is a setup step (`prepare_data_root`): a loader built on a
    missing root with data.synthetic.enabled reports the missing folder and creates nothing."""
    root = tmp_path / "not_yet"
    cfg = make_data_config(root=str(root), backend="torch", synthetic={"enabled": True})
    with pytest.raises(DataError, match="not_yet"):
        build_train_loader(cfg, device=CPU)
    assert not root.exists()
