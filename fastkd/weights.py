"""Weight files in the layouts the recipes publish, mapped onto torchvision's models.

Layouts, detected from the keys (`detect_layout`):

- ``torchvision``: the model's own keys. torchvision state dicts, a run's ``student.pt``, and timm
  ResNets, whose keys are torchvision's (``conv1``, ``bn1``, ``layer1..4``, ``fc``); timm training
  checkpoints wrap them in ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model``.
- ``fastkd-checkpoint``: ``last.pt`` / ``best.pt``, the weights under ``student``.
- ``mmcls``: mmcls / mmpretrain ResNets (usually under ``state_dict`` next to ``meta``):
  ``backbone.*`` -> ``*``, ``head.fc.*`` -> ``fc.*``, ``data_preprocessor.*`` ignored.

Files are read with ``torch.load(..., weights_only=True)``, or with the ``safetensors`` package for
``.safetensors``. Loading is strict: every missing, unexpected or mis-shaped key is one error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastkd.errors import ModelError

# Prefixes that wrappers add to parameter names: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the weights, by preference (timm's order: EMA weights first).
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_MMCLS_RENAMES = (("backbone.", ""), ("head.fc.", "fc."))
_MMCLS_IGNORED = ("data_preprocessor.",)
_SHOWN = 3  # keys named per kind of mismatch
_BN_COUNTER = "num_batches_tracked"  # absent from old files; load_state_dict fills it


@dataclass
class Mapped:
    """A weights file's state dict renamed to torchvision's keys, and how it was found."""

    layout: str
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)  # wrapper key, tensor count, renames
    ignored: list[str] = field(default_factory=list)


def load_failure(exc: BaseException) -> str:
    """``Type: first line`` of why ``torch.load`` failed (its messages run to several lines of
    advice about ``weights_only``), so that an error about a bad file stays one line."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _strip_prefixes(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``state_dict`` without DDP/compile prefixes, and the prefixes that were removed."""
    cleaned, removed = {}, []
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
                    removed += [prefix] if prefix not in removed else []
        cleaned[key] = value
    return cleaned, removed


def strip_wrapper_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove DDP/compile prefixes so a state dict loads into the bare torchvision model."""
    return _strip_prefixes(state_dict)[0]


def read_weights_file(path: Path) -> Any:
    """The object in ``path``: ``torch.load(weights_only=True)``, or safetensors' ``load_file``."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelError(
                f"{path}: reading .safetensors files needs the safetensors package: "
                "pip install safetensors"
            ) from None
        loader, hint = (lambda: load_file(str(path), device="cpu")), "a safetensors file"
    else:
        loader = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
        hint = "a state dict saved with torch.save(model.state_dict(), ...) or a fastkd checkpoint"
    try:
        return loader()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ModelError(
            f"{path}: not a loadable PyTorch weights file ({load_failure(exc)}). Pass {hint}."
        ) from None


def _unwrap(obj: Any, role: str, path: Path) -> tuple[str, dict[str, torch.Tensor], str]:
    """(layout hint, the tensors, where they were found) of a loaded weights file."""
    layout, where = "", ""
    if isinstance(obj, dict) and obj.get("format") == "fastkd-checkpoint":
        where = role if isinstance(obj.get(role), dict) else "student"
        layout, obj = "fastkd-checkpoint", obj.get(where)
    elif isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        where = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), "")
        obj = obj.get(where) if where else obj
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise ModelError(
            f"{path}: holds no model state dict (a mapping of parameter names to tensors)"
        )
    return layout, obj, where


def _map_mmcls(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmcls/mmpretrain keys renamed to torchvision's, and the ignored keys."""
    mapped, ignored = {}, []
    for key, value in state_dict.items():
        if key.startswith(_MMCLS_IGNORED):
            ignored.append(key)
            continue
        for old, new in _MMCLS_RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        mapped[key] = value
    return mapped, ignored


def detect_layout(obj: Any, expected: set[str] | None, *, role: str, path: Path) -> Mapped:
    """The layout of a loaded weights file and its state dict in torchvision's keys.

    ``expected`` is the model's state-dict keys (None: not checked): a file none of whose keys
    (once mapped) are the model's is an unknown layout, refused with the first keys it holds.
    """
    layout, state_dict, where = _unwrap(obj, role, path)
    state_dict, prefixes = _strip_prefixes(state_dict)
    notes = [f"{where + ': ' if where else ''}{len(state_dict)} tensors"]
    notes += [f"{prefix}* -> *" for prefix in prefixes]
    mapped = Mapped(layout or "torchvision", state_dict, notes)
    if not layout and any(k.startswith(("backbone.", "head.fc.")) for k in state_dict):
        mapped.layout = "mmcls"
        mapped.state_dict, mapped.ignored = _map_mmcls(state_dict)
        mapped.notes += ["backbone.* -> *", "head.fc.* -> fc.*"]
    if expected is not None and not expected & mapped.state_dict.keys():
        first = ", ".join(list(state_dict)[:_SHOWN])
        raise ModelError(
            f"{path}: unknown weights layout: none of its {len(state_dict)} keys (e.g. {first}) "
            "names a parameter of the model in a known layout (torchvision or timm ResNet state "
            "dict, mmcls/mmpretrain ResNet, fastkd checkpoint). Check the file and the arch."
        )
    return mapped


def describe(mapped: Mapped, path: Path) -> str:
    """One line on what was loaded, e.g. ``mmcls checkpoint P (state_dict: 102 tensors, ...)``."""
    kind = {"torchvision": "torchvision-layout state dict", "mmcls": "mmcls checkpoint"}
    text = f"{kind.get(mapped.layout, mapped.layout.replace('-', ' '))} {path} ("
    text += ", ".join(mapped.notes)
    if mapped.ignored:
        text += f"; ignored: {', '.join(mapped.ignored)}"
    return text + ")"


def _summary(kind: str, keys: list[str]) -> str:
    return f"{len(keys)} {kind} keys (e.g. {', '.join(keys[:_SHOWN])})"


def check_and_load(model: nn.Module, mapped: Mapped, source: str) -> None:
    """Load ``mapped`` strictly: missing, unexpected and mis-shaped keys are one error."""
    own, given = model.state_dict(), mapped.state_dict
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in given and given[k].shape != own[k].shape
    ]
    if shapes:  # load_state_dict would stop at the first one
        missing = [k for k in own if k not in given and not k.endswith(_BN_COUNTER)]
        unexpected = [k for k in given if k not in own]
    else:  # torch's own accounting: it fills BatchNorm counters that older files lack
        result = model.load_state_dict(given, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
    problems = [_summary(kind, keys) for kind, keys in kinds if keys]
    if problems:
        raise ModelError(
            f"{source}: {mapped.layout} layout does not match architecture "
            f"{type(model).__name__}: {'; '.join(problems)}. "
            "Check teacher.arch / student.arch against the weights."
        )
