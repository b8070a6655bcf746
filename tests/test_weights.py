"""Weight files in each published layout load bitwise into torchvision's model, or fail as one line."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from fastkd.checkpoint import make_checkpoint
from fastkd.errors import ModelError
from fastkd.models import create_model, load_weights

CLASSES = 10


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=CLASSES)


@pytest.fixture(scope="module")
def weights(source) -> dict[str, torch.Tensor]:
    return source.state_dict()


def mmcls_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        (f"head.{k}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in weights.items()
    }


def load(path: Path, num_classes: int = CLASSES) -> tuple[torch.nn.Module, str]:
    model = create_model("resnet18", num_classes)
    report = load_weights(
        model, str(path), arch="resnet18", num_classes=num_classes, role="teacher"
    )
    return model, report


def assert_bitwise(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


def fastkd_checkpoint(source: torch.nn.Module) -> dict[str, Any]:
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1)
    return make_checkpoint(
        epoch=1,
        student=source,
        optimizer=optimizer,
        scheduler=None,
        scaler=None,
        best_top1=0.0,
        config={},
        classes=[str(i) for i in range(CLASSES)],
    )


def test_layouts_load_bitwise(tmp_path, source, weights):
    n = len(weights)
    preprocessor = {
        "data_preprocessor.mean": torch.zeros(3),
        "data_preprocessor.std": torch.ones(3),
    }
    mmcls = {**mmcls_keys(weights), **preprocessor}
    maps = "backbone.* -> *, head.fc.* -> fc.*"
    ignored = "ignored: data_preprocessor.mean, data_preprocessor.std"
    cases = {
        "tv.pth": (weights, f"torchvision-layout state dict {{}} ({n} tensors)"),
        "old_tv.pth": (
            {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")},
            "torchvision-layout state dict {} (102 tensors)",
        ),
        "last.pt": (fastkd_checkpoint(source), f"fastkd checkpoint {{}} (student: {n} tensors)"),
        "mm.pth": (
            {"meta": {"epoch": 100, "CLASSES": ["a"]}, "state_dict": mmcls},
            f"mmcls checkpoint {{}} (state_dict: {n + 2} tensors, {maps}; {ignored})",
        ),
        "mm_bare.pth": (mmcls_keys(weights), f"mmcls checkpoint {{}} ({n} tensors, {maps})"),
        "timm.pth.tar": (
            {
                "epoch": 3,
                "arch": "resnet18",
                "state_dict": {k: torch.zeros_like(v) for k, v in weights.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in weights.items()},
            },
            f"torchvision-layout state dict {{}} (state_dict_ema: {n} tensors, module.* -> *)",
        ),
        "timm_model.pth": (
            {"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3},
            f"torchvision-layout state dict {{}} (model: {n} tensors, module.* -> *)",
        ),
    }
    for name, (content, expected) in cases.items():
        torch.save(content, tmp_path / name)
        model, report = load(tmp_path / name)
        assert_bitwise(model, weights)
        assert report == expected.format(tmp_path / name), name


def test_safetensors_loads_bitwise(tmp_path, weights):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(mmcls_keys(weights), str(path))
    model, report = load(path)
    assert_bitwise(model, weights)
    assert report.startswith(f"mmcls checkpoint {path} ({len(weights)} tensors, backbone.* -> *")


def test_safetensors_missing_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"{}")
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ModelError, match="pip install safetensors") as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def broken(weights: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    mm = mmcls_keys(weights)
    if kind == "missing":
        del mm["backbone.layer4.1.bn2.running_var"]
    elif kind == "unexpected":
        mm["backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    elif kind == "mis-shaped":
        mm["backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    elif kind == "unknown":
        mm = {f"encoder.{k}": v for k, v in weights.items()}
    return mm


@pytest.mark.parametrize(
    ("kind", "culprit"),
    [
        ("missing", "1 missing keys (e.g. layer4.1.bn2.running_var)"),
        ("unexpected", "1 unexpected keys (e.g. layer5.0.conv1.weight)"),
        ("mis-shaped", "1 mis-shaped keys (e.g. conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7))"),
        ("unknown", "unknown weights layout: none of its 122 keys (e.g. encoder.conv1.weight"),
    ],
)
def test_mismatches_are_one_line_naming_keys_and_file(tmp_path, weights, kind, culprit):
    path = tmp_path / f"{kind}.pth"
    torch.save({"state_dict": broken(weights, kind), "meta": {}}, path)
    with pytest.raises(ModelError) as info:
        load(path)
    message = str(info.value)
    assert culprit in message and str(path) in message and "\n" not in message
    if kind != "unknown":
        assert "mmcls layout" in message


def test_class_count_mismatch_keeps_its_message(tmp_path):
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "in1k.pth"
    torch.save({"state_dict": mmcls_keys(imagenet), "meta": {}}, path)
    with pytest.raises(ModelError, match=r"1000 classes \(fc.weight\) but the data has 10"):
        load(path)
