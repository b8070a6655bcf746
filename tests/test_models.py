"""Model factory and weight loading: names, prefixes, class counts, BN folding."""

from __future__ import annotations

import pytest
import torch
import torchvision

from fastkd.models import (
    ModelError,
    create_model,
    fold_batchnorm,
    load_weights,
    read_state_dict,
)


def test_unknown_architecture_suggests_names():
    with pytest.raises(ModelError, match="resnet18"):
        create_model("resnet81", 10)


def test_state_dict_with_wrapper_prefixes_loads(tmp_path):
    source = torchvision.models.resnet18(num_classes=5)
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "w.pt")
    model = create_model("resnet18", 5)
    assert load_weights(
        model, str(tmp_path / "w.pt"), arch="resnet18", num_classes=5, role="student"
    )
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_fastkd_checkpoint_role_is_read(tmp_path):
    weights = torchvision.models.resnet18(num_classes=3).state_dict()
    torch.save({"format": "fastkd-checkpoint", "student": weights, "epoch": 1}, tmp_path / "c.pt")
    assert read_state_dict(tmp_path / "c.pt").keys() == weights.keys()


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_unreadable_weights_are_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save([1, 2, 3], path)  # loadable, but not a state dict
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match="bad.pt"):
        read_state_dict(path)


def test_torchvision_weights_checked_before_download():
    model = create_model("resnet34", 10)
    # ImageNet weights classify 1000 classes: refused before any download is attempted.
    with pytest.raises(ModelError, match="1000 classes"):
        load_weights(
            model, "torchvision:IMAGENET1K_V1", arch="resnet34", num_classes=10, role="teacher"
        )
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        load_weights(model, "torchvision:NOPE", arch="resnet34", num_classes=1000, role="teacher")


def test_download_failure_is_a_clear_error(monkeypatch):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    model = create_model("resnet18", 1000)
    with pytest.raises(ModelError, match="without internet"):
        load_weights(
            model, "torchvision:IMAGENET1K_V1", arch="resnet18", num_classes=1000, role="teacher"
        )


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    # Non-trivial running statistics, as a trained network has.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
