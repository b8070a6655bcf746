"""``python -m fastkd.export``: a run's student as TorchScript or ONNX that gives the student's
logits at any batch size, and one-line errors for what cannot be exported."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from fastkd.config import from_dict, save_config
from fastkd.export import main as export_main

SIZE, CLASSES = 32, 4


def fake_run(run_dir: Path, arch: str = "resnet18") -> torch.nn.Module:
    """A finished run's folder: its resolved config.yaml and the student's student.pt."""
    cfg = from_dict(
        {
            "run": {"dir": str(run_dir)},
            "data": {"root": str(run_dir / "data"), "image_size": SIZE},
            "student": {"arch": arch},
            "loss": {"kind": "ce"},
        }
    )
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=CLASSES).eval()
    torch.save(model.state_dict(), run_dir / "student.pt")
    return model


def images(rows: int) -> torch.Tensor:
    return torch.randn(rows, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(rows))


def test_torchscript_gives_the_students_logits_at_any_batch_size(tmp_path, capsys):
    model = fake_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's TorchScript deprecation is not the user's
        assert export_main([str(tmp_path)]) == 0
    line = capsys.readouterr().out
    path = tmp_path / "student.torchscript.pt"
    assert line.startswith(f"wrote {path} (torchscript: resnet18, {CLASSES} classes")
    assert "max |logit diff|" in line and "mean [0.485, 0.456, 0.406]" in line
    extra = {"fastkd.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's own deprecation notice
        loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["fastkd.json"])["classes"] == CLASSES
    with torch.no_grad():
        for rows in (1, 7):
            torch.testing.assert_close(loaded(images(rows)), model(images(rows)))


def test_pt2_is_torch_export_with_a_dynamic_batch(tmp_path, capsys):
    model = fake_run(tmp_path)
    assert export_main([str(tmp_path), "--format", "pt2"]) == 0
    assert "reloaded with torch.export.load" in capsys.readouterr().out
    extra = {"fastkd.json": ""}
    loaded = torch.export.load(str(tmp_path / "student.pt2"), extra_files=extra).module()
    assert json.loads(extra["fastkd.json"])["arch"] == "resnet18"
    with torch.no_grad():
        for rows in (1, 6):
            torch.testing.assert_close(loaded(images(rows)), model(images(rows)))


def test_onnx_runs_in_onnxruntime_with_a_dynamic_batch(tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")  # a guard: the dev extra installs it
    model = fake_run(tmp_path)
    out = tmp_path / "exported" / "model.onnx"
    assert export_main([str(tmp_path), "--format", "onnx", "--out", str(out)]) == 0
    assert "run with onnxruntime" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for rows in (1, 5):
            (logits,) = session.run(None, {"images": images(rows).numpy()})
            torch.testing.assert_close(
                torch.from_numpy(logits), model(images(rows)), rtol=1e-4, atol=1e-4
            )
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["fastkd"])["image_size"] == SIZE


def test_onnx_without_its_packages_is_one_line(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    assert export_main([str(tmp_path), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install onnx onnxscript" in err
    assert not (tmp_path / "student.onnx").exists()


def test_an_export_that_gives_other_logits_is_an_error(tmp_path, monkeypatch, capsys):
    """The check after writing fails the export (exit status 2, one line) when the file's
    logits are not the model's: here the traced model is one with another classifier bias."""
    fake_run(tmp_path)
    real_trace = torch.jit.trace

    def wrong_trace(model, example):
        other = torchvision.models.resnet18(num_classes=CLASSES).eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            other.fc.bias += 0.5
        return real_trace(other, example)

    monkeypatch.setattr(torch.jit, "trace", wrong_trace)
    assert export_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differ from the model's by up to 0.5" in err, err


def test_what_cannot_be_exported_is_one_line_naming_it(tmp_path, capsys):
    fake_run(tmp_path / "run")
    (tmp_path / "run" / "student.pt").rename(tmp_path / "run" / "elsewhere.pt")
    elsewhere = str(tmp_path / "run" / "elsewhere.pt")
    cases = [
        ([str(tmp_path / "missing")], "no such folder"),
        ([str(tmp_path)], "no config.yaml"),  # not a run folder
        ([str(tmp_path / "run")], "--weights"),  # no student.pt: says how to pick another file
        ([str(tmp_path / "run"), "--weights", str(tmp_path / "nope.pt")], "nope.pt"),
        ([str(tmp_path / "run"), "--weights", elsewhere, "--out", str(tmp_path)], "is a folder"),
    ]
    other = tmp_path / "other"
    fake_run(other, arch="mobilenet_v3_small")
    torch.save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), other / "r18.pt")
    cases.append(([str(other), "--weights", str(other / "r18.pt")], "r18.pt"))  # another arch
    deeper = tmp_path / "deeper"  # the same family, another depth: missing keys, named
    fake_run(deeper, arch="resnet34")
    torch.save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), deeper / "r18.pt")
    cases.append(([str(deeper), "--weights", str(deeper / "r18.pt")], "student.arch=resnet34"))
    for argv, fragment in cases:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fastkd: error: ") and err.count("\n") == 1, err
        assert fragment in err, (fragment, err)
