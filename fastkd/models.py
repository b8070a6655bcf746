"""Architecture factory and explicit weight loading.

`create_model` maps a torchvision classification architecture name to a freshly initialised
model; `load_weights` is a separate, explicit step that accepts a weights file (any layout of
`fastkd.weights`), ``torchvision:WEIGHTS_NAME`` or ``random``, and checks the class count against the data.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from fastkd.errors import ModelError
from fastkd.weights import (
    Mapped,
    check_and_load,
    describe,
    detect_layout,
    read_weights_file,
)

log = logging.getLogger("fastkd")


def classification_archs() -> list[str]:
    """Names of torchvision's image-classification architectures."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format models and batches use per ``train.channels_last``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def create_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier ``arch`` with ``num_classes`` outputs."""
    names = classification_archs()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown architecture {arch!r}: not a torchvision classification model.{hint}"
        )
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def classifier_out_features(state_dict: dict[str, Any], model: nn.Module) -> tuple[str, int] | None:
    """The name and output size of the model's last Linear layer as found in ``state_dict``."""
    last_linear = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
    if last_linear is None:
        return None
    weight = state_dict.get(f"{last_linear}.weight")
    if not isinstance(weight, torch.Tensor):
        return None
    return last_linear, int(weight.shape[0])


def read_state_dict(path: str | Path, role: str = "student") -> dict[str, torch.Tensor]:
    """Model weights from a file in any layout `fastkd.weights` knows, in torchvision's keys."""
    path = _existing_file(path, role)
    return detect_layout(read_weights_file(path), None, role=role, path=path).state_dict


def _existing_file(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"{role}.weights: file not found: {path}. Point {role}.weights at a state dict or fastkd "
            f"checkpoint (a loss.kind=ce run's student.pt; python -m fastkd.quickstart trains the "
            f"quickstart teacher first), or use {role}.weights=random for a smoke test"
        )
    return path


def _check_classes(
    state_dict: dict[str, Any], model: nn.Module, source: str, num_classes: int
) -> None:
    found = classifier_out_features(state_dict, model)
    if found is not None and found[1] != num_classes:
        raise ModelError(
            f"{source}: the weights classify into {found[1]} classes ({found[0]}.weight) but the data "
            f"has {num_classes}; use weights trained on this data set or point data.root at the matching data"
        )


def load_state_dict_checked(
    model: nn.Module, state_dict: dict[str, Any], source: str, num_classes: int
) -> None:
    """Load a torchvision ``state_dict`` strictly, turning mismatches into one readable error."""
    _check_classes(state_dict, model, source, num_classes)
    check_and_load(model, Mapped("torchvision", state_dict), source)


def _load_file(model: nn.Module, spec: str, num_classes: int, role: str) -> str:
    """Load the weights file ``spec`` in whichever layout it has; describe what was mapped."""
    path = _existing_file(spec, role)
    expected = set(model.state_dict())
    mapped = detect_layout(read_weights_file(path), expected, role=role, path=path)
    source = f"{role}.weights={spec}"
    _check_classes(mapped.state_dict, model, source, num_classes)
    check_and_load(model, mapped, source)
    return describe(mapped, path)


def _torchvision_weights(arch: str, name: str) -> Any:
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        raise ModelError(f"torchvision has no pretrained weights for {arch!r}") from None
    short = name.split(".")[-1]
    if short == "DEFAULT":
        return enum.DEFAULT
    for member in enum:
        if member.name == short:
            return member
    raise ModelError(
        f"torchvision:{name}: no such weights for {arch}; available: {', '.join(m.name for m in enum)}"
    )


def load_weights(model: nn.Module, spec: str, *, arch: str, num_classes: int, role: str) -> str:
    """Load ``spec`` into ``model`` and return a one-line description of what was loaded.

    ``spec`` is '' (keep the random init), ``random`` (the same, with a warning: tests and
    benchmarks only), ``torchvision:WEIGHTS_NAME`` (downloaded by torchvision when the node has
    internet) or a path to a weights file: a torchvision/timm state dict, a fastkd checkpoint,
    an mmcls/mmpretrain checkpoint or a ``.safetensors`` file (see `fastkd.weights`). ``role`` names the model in messages.
    """
    if spec == "":
        return "random init"
    if spec == "random":
        warnings.warn(
            f"{role} uses random weights ({role}.weights=random): fine for tests and benchmarks, "
            "meaningless for distillation",
            stacklevel=2,
        )
        return "random init (requested)"
    if spec.startswith("torchvision:"):
        weights = _torchvision_weights(arch, spec.split(":", 1)[1])
        classes = len(weights.meta.get("categories") or [])
        if classes and classes != num_classes:
            raise ModelError(
                f"{role}.weights={spec} classifies into {classes} classes but the data has {num_classes}; "
                f"train a {role} on this data (loss.kind=ce) and pass its student.pt instead"
            )
        try:
            state_dict = weights.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001 - network/cache failures are the user's to fix
            raise ModelError(
                f"{role}.weights={spec}: could not download ({type(exc).__name__}: {exc}). On a node without "
                f"internet, download it elsewhere and pass the file path as {role}.weights."
            ) from None
        load_state_dict_checked(model, state_dict, f"{role}.weights={spec}", num_classes)
        return f"torchvision {weights}"
    return _load_file(model, spec, num_classes, role)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm layers into the preceding convolutions (inference only).

    Uses torch.fx; models that cannot be traced are returned unchanged with a log line, since
    folding is an optimisation and never a requirement.
    """
    from torch.fx.experimental.optimization import fuse

    model.eval()
    try:
        return fuse(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure just means "no folding"
        log.info("BatchNorm folding skipped for %s: %s", type(model).__name__, exc)
        return model
