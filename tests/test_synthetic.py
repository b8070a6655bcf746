"""The synthetic ImageFolder: determinism, markers, atomic writes, class design, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastkd.config import SyntheticConfig, from_dict
from fastkd.data import DataError, synthetic
from fastkd.data.folder import scan_imagefolder
from fastkd.data.synthetic import (
    MARKER_NAME,
    class_specs,
    make_synthetic_imagefolder,
    prepare_synthetic,
    read_marker,
    render_image,
)

SMALL = SyntheticConfig(
    enabled=True, num_classes=3, train_per_class=2, val_per_class=1, image_size=32, seed=5
)


def prepared_and_scanned(cfg):
    """What a run does with its data section: generate when asked, then scan both splits."""
    prepare_synthetic(cfg)
    return scan_imagefolder(cfg.root)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_fields_give_identical_bytes_and_other_seeds_do_not(tmp_path):
    first = make_synthetic_imagefolder(tmp_path / "a", SMALL)
    second = make_synthetic_imagefolder(tmp_path / "b", SMALL)
    assert _digest(first) == _digest(second)
    assert len([k for k in _digest(first) if k.endswith(".JPEG")]) == 3 * 2 + 3 * 1
    reseeded = make_synthetic_imagefolder(tmp_path / "c", dataclasses.replace(SMALL, seed=6))
    images = {k: v for k, v in _digest(reseeded).items() if k.endswith(".JPEG")}
    assert images.keys() == {k for k in _digest(first) if k.endswith(".JPEG")}
    assert all(images[k] != _digest(first)[k] for k in images)


def test_layout_sizes_and_marker(tmp_path):
    root = make_synthetic_imagefolder(tmp_path / "set", SMALL)
    index = prepared_and_scanned(
        from_dict({"data": {"root": str(root), "synthetic": dataclasses.asdict(SMALL)}}).data
    )
    assert index.num_classes == 3 and len(index.train) == 6 and len(index.val) == 3
    assert list(index.classes) == sorted(index.classes)  # zero-padded names sort by class index
    assert [c.split("_", 1)[0] for c in index.classes] == ["00", "01", "02"]
    with Image.open(index.train.files[0]) as image:
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
    marker = read_marker(root)
    assert marker is not None and marker["seed"] == 5 and marker["num_classes"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_existing_set_is_reused_and_other_parameters_are_an_error(tmp_path):
    root = make_synthetic_imagefolder(tmp_path / "set", SMALL)
    before = _digest(root)
    assert make_synthetic_imagefolder(root, SMALL) == root  # no-op
    assert _digest(root) == before
    with pytest.raises(
        DataError, match=r"other parameters \(num_classes: 3 there vs 4 wanted\)"
    ) as info:
        make_synthetic_imagefolder(root, dataclasses.replace(SMALL, num_classes=4))
    assert str(root) in str(info.value) and "delete" in str(info.value)
    assert _digest(root) == before


def test_user_data_is_never_overwritten(tmp_path):
    root = tmp_path / "mine"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="never overwritten"):
        make_synthetic_imagefolder(root, SMALL)
    cfg = from_dict({"data": {"root": str(root), "synthetic": {"enabled": True}}}).data
    with (
        pytest.warns(UserWarning, match="did not generate"),
        pytest.raises(DataError, match="holds no images"),
    ):
        prepared_and_scanned(cfg)  # used as is (and found incomplete), not replaced
    assert (root / "train" / "cat" / "keep.txt").read_text() == "precious"


def test_prepare_synthetic_generates_into_a_missing_or_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("missing", "empty"):
        fields = dataclasses.asdict(SMALL)
        cfg = from_dict({"data": {"root": str(tmp_path / name), "synthetic": fields}}).data
        index = prepared_and_scanned(cfg)
        assert index.num_classes == 3 and read_marker(tmp_path / name) is not None
    disabled = from_dict({"data": {"root": str(tmp_path / "other")}}).data
    with pytest.raises(DataError, match="does not exist"):
        prepared_and_scanned(disabled)


def test_a_rank_that_loses_the_race_keeps_the_winners_set(tmp_path, monkeypatch):
    root = tmp_path / "set"
    winner = make_synthetic_imagefolder(tmp_path / "winner", SMALL)
    real_rename = os.rename

    def rename_after_another_rank(src, dst):
        shutil.copytree(winner, dst)  # another process finished first
        real_rename(src, dst)  # fails: dst is not empty

    monkeypatch.setattr(synthetic.os, "rename", rename_after_another_rank)
    assert make_synthetic_imagefolder(root, SMALL) == root
    assert _digest(root) == _digest(winner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "winner"]  # temp copy removed


def test_class_pairs_differ_in_exactly_one_cue():
    specs = class_specs(20)
    keys = [(s.shape, s.colour, s.orientation) for s in specs]
    assert len(set(keys)) == 20
    for first, second in zip(keys[0::2], keys[1::2], strict=True):
        assert sum(a != b for a, b in zip(first, second, strict=True)) == 1
    # No single cue identifies a class: every cue value is shared by several classes.
    for cue in range(3):
        counts = {}
        for key in keys:
            counts[key[cue]] = counts.get(key[cue], 0) + 1
        assert max(counts.values()) >= 2
    assert class_specs(10) == specs[:10]  # a bigger set extends a smaller one
    with pytest.raises(DataError, match="num_classes"):
        class_specs(10_000)


def test_images_vary_within_a_class_and_classes_differ():
    spec_a, spec_b = class_specs(2)
    a1 = render_image(spec_a, np.random.default_rng(1), 48).astype(np.float32)
    a2 = render_image(spec_a, np.random.default_rng(2), 48).astype(np.float32)
    b1 = render_image(spec_b, np.random.default_rng(1), 48).astype(np.float32)
    assert a1.shape == (48, 48, 3)
    assert np.abs(a1 - a2).mean() > 10  # position, scale, clutter and noise change per image
    assert np.abs(a1 - b1).mean() > 1  # same generator stream, another class: other pixels
    assert a1.std() > 20  # not a flat image


def test_each_image_is_rendered_and_encoded_once(tmp_path, monkeypatch):
    """The work a set costs: one render and one JPEG encode per file, none repeated or wasted
    (its wall-clock time belongs to benchmarks, not to a test on a shared machine)."""
    calls = {"render": 0, "encode": 0}
    render, encode = synthetic.render_image, synthetic.encode_jpeg

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(synthetic, "render_image", counted("render", render))
    monkeypatch.setattr(synthetic, "encode_jpeg", counted("encode", encode))
    cfg = dataclasses.replace(
        SyntheticConfig(), enabled=True, num_classes=3, train_per_class=4, val_per_class=2
    )
    root = make_synthetic_imagefolder(tmp_path / "set", cfg)
    files = [f for f in root.rglob("*.JPEG")]
    assert len(files) == 3 * (4 + 2) == calls["render"] == calls["encode"]
    make_synthetic_imagefolder(root, cfg)  # already there: reused, nothing rendered again
    assert calls["render"] == len(files)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--out",
        str(out),
        "--num-classes",
        "2",
        "--train-per-class",
        "2",
        "--val-per-class",
        "1",
        "--image-size",
        "24",
    ]
    assert synthetic.main(argv) == 0
    assert "2 classes, 4 train + 2 val" in capsys.readouterr().out
    assert read_marker(out)["image_size"] == 24
    assert synthetic.main([*argv[:-1], "32"]) == 2  # same folder, other size: refused
    assert "other parameters" in capsys.readouterr().err
    assert MARKER_NAME in os.listdir(out)
    # SyntheticConfig checks its own ranges: a one-line error, nothing written.
    assert synthetic.main(["--out", str(tmp_path / "bad"), "--image-size", "8"]) == 2
    assert "data.synthetic.image_size must be >= 16" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_module_runs_without_being_imported_twice():
    """``python -m fastkd.data.synthetic`` starts from the package, which must not import the
    generator first (runpy would then warn that the module it runs is already imported)."""
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "fastkd.data.synthetic", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "found in sys.modules" not in result.stderr
