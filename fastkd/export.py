"""``python -m fastkd.export RUN_DIR [--format torchscript|pt2|onnx] [--weights F] [--out PATH]``.

Turns a run's trained student into a file that needs no fastkd to run: TorchScript (what libtorch
C++ and older serving stacks load; PyTorch deprecates it, so its warnings are silenced here),
``torch.export``'s ``.pt2`` (PyTorch's successor: ``torch.export.load(path).module()``) or ONNX
(needs the ``onnx`` and ``onnxscript`` packages: the ``export`` extra). The
architecture and input size come from the run's ``config.yaml``, the class count from the weights;
the batch dimension stays dynamic. The exported model is eval-mode and takes float32 NCHW RGB
images normalized with the run's ``data.mean`` / ``data.std`` (printed, and stored in the file's
metadata). After writing, the file is loaded back and its logits on a batch of a different size
are compared with the PyTorch model's (for ONNX when ``onnxruntime`` is installed; otherwise
``onnx.checker`` validates the graph), and the line printed says what was checked.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastkd.config import load_config
from fastkd.errors import ModelError, UserError
from fastkd.models import (
    classifier_out_features,
    create_model,
    load_state_dict_checked,
    read_state_dict,
)

FORMATS = {"torchscript": ".torchscript.pt", "pt2": ".pt2", "onnx": ".onnx"}
ONNX_HINT = 'pip install onnx onnxscript (or pip install -e ".[export]")'
CHECK_ROWS = 3  # the check batch differs from the traced one (2): the batch is dynamic
CHECK_RTOL = 1e-3  # of the largest logit: far above float32 reordering, far below a wrong graph


@dataclass(frozen=True)
class Student:
    model: nn.Module
    arch: str
    classes: int
    image_size: int
    mean: list[float]  # the 0-255 scale, as data.mean
    std: list[float]

    def describe(self) -> str:
        return (
            f"{self.arch}, {self.classes} classes, input N x 3 x {self.image_size} x "
            f"{self.image_size} float32 RGB, (x / 255 - mean) / std with mean "
            f"{[round(m / 255, 4) for m in self.mean]} std {[round(s / 255, 4) for s in self.std]}"
        )


def load_student(run_dir: Path, weights: str | None) -> Student:
    """The run's student (``weights``: a file, default RUN_DIR/student.pt) in eval mode."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder; pass a run folder (the run's run.dir)")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml (is it a fastkd run folder, run.dir?)")
    cfg = load_config(run_dir / "config.yaml")
    path = Path(weights) if weights else run_dir / "student.pt"
    if not path.is_file():
        raise ModelError(
            f"{path}: no such file; a finished run has student.pt (pass --weights RUN_DIR/last.pt "
            "or best.pt for a run that has not finished)"
        )
    arch = cfg.student.arch
    state_dict = read_state_dict(path)  # any layout fastkd.weights knows, read once
    source = f"{path} (student.arch={arch} in {run_dir / 'config.yaml'})"
    found = classifier_out_features(state_dict, create_model(arch, 1))
    if found is None:
        raise ModelError(f"{source}: the file has no classifier weights for {arch}")
    model = create_model(arch, found[1])
    load_state_dict_checked(model, state_dict, source, found[1])
    data = cfg.data
    return Student(model.eval(), arch, found[1], data.image_size, list(data.mean), list(data.std))


def export_torchscript(student: Student, out: Path, example: torch.Tensor) -> str:
    """Trace, save, load back and compare; returns what was checked."""
    with warnings.catch_warnings():  # "torch.jit.* is deprecated": the user asked for it
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        traced = torch.jit.trace(student.model, example)
        extra = {"fastkd.json": json.dumps(_metadata(student))}
        torch.jit.save(traced, str(out), _extra_files=extra)
        loaded = torch.jit.load(str(out))
    return _compared("reloaded with torch.jit.load", loaded, student)


def export_pt2(student: Student, out: Path, example: torch.Tensor) -> str:
    """``torch.export`` with a dynamic batch, saved, loaded back and compared."""
    program = torch.export.export(
        student.model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    extra = {"fastkd.json": json.dumps(_metadata(student))}
    torch.export.save(program, str(out), extra_files=extra)
    return _compared(
        "reloaded with torch.export.load", torch.export.load(str(out)).module(), student
    )


def _compared(how: str, exported: Callable[[torch.Tensor], torch.Tensor], student: Student) -> str:
    """Compare the exported model's logits with the PyTorch model's; raise if they differ."""
    check = _check_batch(student)
    with torch.no_grad():
        want = student.model(check)
        try:
            got = torch.as_tensor(exported(check))
        except Exception as exc:  # noqa: BLE001 - whatever the runtime raises, say where
            raise ModelError(
                f"the exported model failed on a batch of {CHECK_ROWS}: {exc}"
            ) from None
    if got.shape != want.shape:
        raise ModelError(
            f"the exported model gives logits of shape {tuple(got.shape)} on a batch of "
            f"{CHECK_ROWS}, the model {tuple(want.shape)}; the file was written but is unusable"
        )
    diff = (got - want).abs().max().item()
    tolerance = CHECK_RTOL * max(1.0, want.abs().max().item())
    if not diff <= tolerance:  # NaN fails too
        raise ModelError(
            f"the exported model's logits differ from the model's by up to {diff:.3g} (more than "
            f"{tolerance:.3g}) on a batch of {CHECK_ROWS}; the file was written but is not right"
        )
    return f"{how}: max |logit diff| {diff:.2g} on a batch of {CHECK_ROWS}"


def export_onnx(student: Student, out: Path, example: torch.Tensor) -> str:
    """Export (dynamo exporter, dynamic batch), validate, and run it when onnxruntime exists."""
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise UserError(
            f"--format onnx needs the onnx and onnxscript packages: {ONNX_HINT}"
        ) from exc
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        student.model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
        input_names=["images"], output_names=["logits"], verbose=False,
    )  # fmt: skip
    program.model.metadata_props.update({"fastkd": json.dumps(_metadata(student))})
    program.save(str(out), external_data=False)
    onnx.checker.check_model(str(out))
    try:
        import onnxruntime
    except ImportError:
        return "onnx.checker passed; not run (install onnxruntime to compare logits)"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

    return _compared("run with onnxruntime", run, student)


def _check_batch(student: Student) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(CHECK_ROWS, 3, student.image_size, student.image_size, generator=generator)


def _metadata(student: Student) -> dict[str, object]:
    return {"arch": student.arch, "classes": student.classes, "image_size": student.image_size,
            "mean_255": student.mean, "std_255": student.std}  # fmt: skip


def export(run_dir: str | Path, fmt: str = "torchscript", *, weights: str | None = None,
           out: str | Path | None = None) -> tuple[Path, str]:  # fmt: skip
    """Export the run's student; returns (the file written, a line saying what it is)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    student = load_student(run_dir, weights)
    path = Path(out) if out else run_dir / f"student{FORMATS[fmt]}"
    if path.is_dir():
        raise UserError(
            f"--out {path} is a folder; give the file to write, e.g. {path / 'student'}{FORMATS[fmt]}"
        )
    example = torch.randn(2, 3, student.image_size, student.image_size)
    exporter = {"torchscript": export_torchscript, "pt2": export_pt2, "onnx": export_onnx}[fmt]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):  # torch's writers fail with a C++ traceback
            raise PermissionError(errno.EACCES, "the folder is not writable")
        with torch.no_grad():
            checked = exporter(student, path, example)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path, f"wrote {path} ({fmt}: {student.describe()}); {checked}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.export", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (run.dir)")
    parser.add_argument("--format", default="torchscript", choices=sorted(FORMATS))
    parser.add_argument("--weights", default=None, help="weights file (default RUN_DIR/student.pt)")
    parser.add_argument("--out", default=None, help="output file (default RUN_DIR/student.<ext>)")
    args = parser.parse_args(argv)
    try:
        _, line = export(args.run_dir, args.format, weights=args.weights, out=args.out)
    except UserError as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
