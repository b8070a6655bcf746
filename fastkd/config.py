"""Typed run configuration: YAML files with `_base_` inheritance, dotted overrides, validation.

A config is a tree of dataclasses (`Config` with sections `run`, `data`, `teacher`, `student`,
`loss`, `optim`, `sched`, `train`). Every field has a type, a default and a one-line doc
(``python -m fastkd.config`` prints them all). YAML is read with a safe loader only: a config
file can never execute code.

Values mean what a person typed: scalars follow YAML 1.2's core schema rather than the YAML 1.1
rules of ``yaml.safe_load``, so ``1e-3`` is a float (1.1 reads a string), ``off``/``on``/``yes``/``no``
are words (1.1 reads booleans), ``010`` is ten (1.1: octal eight) and ``2026-12-02`` a string. A
float field also takes any string Python's ``float()`` accepts, an int field any ``int()`` takes
(``1_000``); a bool field takes true/false/yes/no/on/off; a choice field offering ``off``/``on``
takes a boolean as that word. `dump_yaml` (config.yaml, ``--print-config``) quotes every string
that a YAML 1.1 or 1.2 reader would take for something else, so the file reads back unchanged.

Loading order: the file's ``_base_`` files (paths relative to the file, merged in order, deeply),
then the file itself, then ``dotted.key=value`` overrides whose values are parsed as YAML scalars or
lists. The result is validated: an unknown key fails naming the key and the closest valid one, a
value of the wrong type or out of range fails naming the key and what is allowed.

Validation lives beside the fields: `_build` coerces each value to its field's type, then each
section's ``__post_init__`` checks its own ranges (so a section built in code is checked too), and
`Config.validate` checks what needs the whole config (see there). Keys renamed into sections
(`RENAMED_KEYS`: ``data.dali_device`` is now ``data.dali.device``, ``train.profile`` is
``train.profile.enabled``...) are still read, in files and overrides, with a ``FutureWarning``
naming the old and the new key; giving both with different values is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fastkd.errors import ConfigError

# The one wording of this mistake: the config and the data code (for a `DataConfig` built in
# code, which the config never saw) raise it alike.
DATA_ROOT_EMPTY = (
    "data.root is empty: set it to an ImageFolder root holding train/ and val/ "
    "(e.g. data.root=/data/imagenet), or to the folder data.synthetic.enabled=true generates "
    "the synthetic set in"
)


def _require(ok: bool, message: str) -> None:
    """Raise `ConfigError` with ``message`` unless ``ok`` (the sections' range checks)."""
    if not ok:
        raise ConfigError(message)


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose one-line documentation lives in its metadata."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class RunConfig:
    dir: str = _doc(
        "folder for config.yaml, metrics.jsonl, checkpoints and summary.json",
        default="runs/default",
    )
    seed: int = _doc("seed of every random generator (data order, augmentation, init)", default=0)
    deterministic: bool = _doc(
        "deterministic kernels (slower); also fixes cuDNN algorithm choice", default=False
    )
    resume: str = _doc(
        "'' = fresh run; 'auto' = run.dir/last.pt when it exists; else a checkpoint path",
        default="",
    )
    setup_timeout_min: int = _doc(
        "under torchrun, how long ranks wait for each other in setup steps (rank 0 scanning "
        "data.root); training collectives keep NCCL's own timeout",
        default=60,
    )

    def __post_init__(self) -> None:
        _require(bool(self.dir), "run.dir is empty: name the folder the run writes to")
        _require(
            self.setup_timeout_min >= 1,
            f"run.setup_timeout_min must be >= 1, got {self.setup_timeout_min}",
        )


@dataclass
class SyntheticConfig:
    enabled: bool = _doc(
        "generate a synthetic JPEG ImageFolder at data.root when it is missing", default=False
    )
    num_classes: int = _doc("classes of the synthetic set", default=10)
    train_per_class: int = _doc("training images per class", default=300)
    val_per_class: int = _doc("validation images per class", default=60)
    image_size: int = _doc("side of the generated JPEGs in pixels", default=72)
    seed: int = _doc(
        "seed of the generator (the set is a pure function of these fields)", default=0
    )

    def __post_init__(self) -> None:
        _require(
            self.num_classes >= 2,
            f"data.synthetic.num_classes must be >= 2, got {self.num_classes}",
        )
        _require(
            self.train_per_class >= 1 and self.val_per_class >= 1,
            "data.synthetic.train_per_class and val_per_class must be >= 1",
        )
        _require(
            self.image_size >= 16, f"data.synthetic.image_size must be >= 16, got {self.image_size}"
        )


@dataclass
class DaliConfig:
    device: Literal["auto", "gpu", "cpu"] = _doc(
        "DALI decode on the GPU ('mixed') or the CPU; auto = GPU when CUDA is available",
        default="auto",
    )
    hw_decoder_load: float = _doc(
        "share of JPEGs sent to the A100/H100 hardware decoder (0-1)", default=0.65
    )
    preallocate: bool = _doc(
        "preallocate DALI decoder memory for ImageNet-sized images (no growth stalls)", default=True
    )

    def __post_init__(self) -> None:
        _require(
            0.0 <= self.hw_decoder_load <= 1.0,
            f"data.dali.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}",
        )


@dataclass
class DataConfig:
    root: str = _doc(
        "ImageFolder root holding train/<class>/*.JPEG and val/<class>/*.JPEG", default=""
    )
    backend: Literal["dali", "torch"] = _doc(
        "'dali' (GPU or CPU pipeline) or 'torch' (torchvision DataLoader)", default="dali"
    )
    image_size: int = _doc("training crop and validation center-crop side in pixels", default=224)
    crop_area: list[float] = _doc(
        "training random-resized-crop area range, as fractions of the image",
        default_factory=lambda: [0.08, 1.0],
    )
    val_resize: int = _doc(
        "validation: resize the shorter side to this before the center crop", default=256
    )
    batch_size: int = _doc(
        "images per process per step (global batch = batch_size x world size)", default=32
    )
    val_batch_size: int = _doc(
        "validation batch per process; 0 = same as data.batch_size", default=0
    )
    workers: int = _doc("DALI CPU threads or DataLoader worker processes per process", default=4)
    on_bad_image: Literal["error", "skip"] = _doc(
        "an undecodable image stops the run ('error') or is left out with a warning ('skip')",
        default="error",
    )
    prescan: bool = _doc(
        "check every file's signature and end marker before training (~20 us a file); off for huge trusted sets (bad files are then caught when decoded)",
        default=True,
    )
    mean: list[float] = _doc(
        "per-channel mean on the 0-255 scale (RGB)",
        default_factory=lambda: [0.485 * 255, 0.456 * 255, 0.406 * 255],
    )
    std: list[float] = _doc(
        "per-channel std on the 0-255 scale (RGB)",
        default_factory=lambda: [0.229 * 255, 0.224 * 255, 0.225 * 255],
    )
    prefetch: int = _doc(
        "batches prepared ahead (DALI prefetch_queue_depth / DataLoader prefetch_factor)", default=2
    )
    output_dtype: Literal["auto", "float32", "float16"] = _doc(
        "dtype of the batches; auto = float16 on a GPU under AMP, else float32", default="auto"
    )
    dali: DaliConfig = _doc("settings of the DALI backend only", default_factory=DaliConfig)
    synthetic: SyntheticConfig = _doc(
        "the generated quickstart data set", default_factory=SyntheticConfig
    )

    def __post_init__(self) -> None:
        # data.root is left to Config.validate: its default is empty on purpose.
        _require(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")
        _require(
            self.val_resize >= self.image_size,
            f"data.val_resize ({self.val_resize}) must be >= data.image_size ({self.image_size})",
        )
        _require(
            len(self.crop_area) == 2 and 0 < self.crop_area[0] <= self.crop_area[1] <= 1,
            f"data.crop_area must be [min, max] with 0 < min <= max <= 1, got {self.crop_area}",
        )
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.val_batch_size >= 0,
            f"data.val_batch_size must be >= 0, got {self.val_batch_size}",
        )
        _require(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
        _require(self.prefetch >= 1, f"data.prefetch must be >= 1, got {self.prefetch}")
        _require(
            len(self.mean) == 3 and len(self.std) == 3,
            "data.mean and data.std need 3 values (R, G, B)",
        )
        _require(all(v > 0 for v in self.std), f"data.std must be positive, got {self.std}")


@dataclass
class TeacherConfig:
    arch: str = _doc(
        "torchvision classification architecture name, e.g. resnet34", default="resnet34"
    )
    weights: str = _doc(
        "state-dict or fastkd checkpoint path, 'torchvision:WEIGHTS_NAME', or 'random' (tests only)",
        default="torchvision:IMAGENET1K_V1",
    )
    fold_bn: bool = _doc(
        "fold the teacher's BatchNorm into its convolutions (inference-only speedup)", default=True
    )


@dataclass
class StudentConfig:
    arch: str = _doc(
        "torchvision classification architecture name, e.g. resnet18", default="resnet18"
    )
    weights: str = _doc(
        "'' = random init (the usual), or a state-dict / checkpoint / 'torchvision:NAME' to start from",
        default="",
    )


@dataclass
class LossConfig:
    kind: Literal["wsld", "kd", "ce"] = _doc(
        "'wsld' (distill), 'kd' (Hinton KD), 'ce' (hard labels only: teachers, baselines)",
        default="wsld",
    )
    tau: float = _doc("distillation temperature", default=2.0)
    loss_weight: float = _doc("weight of the distillation term (WSLD's alpha)", default=2.5)
    ce_weight: float = _doc(
        "weight of the student's hard-label cross-entropy next to the distillation term (wsld, "
        "kd; a ce run trains on that CE alone)",
        default=1.0,
    )
    impl: Literal["auto", "fused", "reference"] = _doc(
        "WSLD implementation: fused C++/CUDA op, plain PyTorch, or fused when built", default="auto"
    )
    label_smoothing: float = _doc(
        "label smoothing of the hard-label CE term (every loss.kind; WSLD's weights w keep "
        "using the unsmoothed CEs)",
        default=0.0,
    )

    def __post_init__(self) -> None:
        # The loss functions check tau again for library callers; this names the config key.
        _require(0 < self.tau < math.inf, f"loss.tau must be > 0 and finite, got {self.tau}")
        _require(
            self.loss_weight >= 0 and self.ce_weight >= 0,
            "loss.loss_weight and loss.ce_weight must be >= 0",
        )
        _require(
            0.0 <= self.label_smoothing < 1.0,
            f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )


@dataclass
class OptimConfig:
    lr: float = _doc(
        "base learning rate (for the global batch; not rescaled automatically)", default=0.1
    )
    momentum: float = _doc("SGD momentum", default=0.9)
    weight_decay: float = _doc("L2 weight decay", default=1e-4)
    nesterov: bool = _doc("Nesterov momentum", default=False)
    norm_weight_decay: bool = _doc(
        "apply weight decay to normalization weights and biases too", default=True
    )
    fused: Literal["auto", "torch", "apex", "off"] = _doc(
        "fused SGD step: torch's where supported (auto), apex FusedSGD, or off", default="auto"
    )

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(
            self.momentum >= 0 and self.weight_decay >= 0,
            "optim.momentum and optim.weight_decay must be >= 0",
        )
        _require(
            not (self.nesterov and self.momentum == 0), "optim.nesterov needs optim.momentum > 0"
        )


@dataclass
class SchedConfig:
    kind: Literal["step", "cosine", "constant"] = _doc(
        "learning-rate schedule, updated every step", default="step"
    )
    milestones: list[int] = _doc(
        "step schedule: epochs at which lr is multiplied by gamma",
        default_factory=lambda: [30, 60, 90],
    )
    gamma: float = _doc("step schedule: decay factor", default=0.1)
    min_lr: float = _doc("cosine schedule: final learning rate", default=0.0)
    warmup_epochs: float = _doc(
        "linear warmup length in epochs (fractions allowed); 0 = none", default=0.0
    )
    warmup_start_factor: float = _doc("warmup starts at lr x this factor", default=0.1)

    def __post_init__(self) -> None:
        _require(
            self.warmup_epochs >= 0, f"sched.warmup_epochs must be >= 0, got {self.warmup_epochs}"
        )
        _require(0 < self.warmup_start_factor <= 1, "sched.warmup_start_factor must be in (0, 1]")
        _require(all(m >= 0 for m in self.milestones), "sched.milestones must be >= 0")
        _require(
            self.milestones == sorted(self.milestones),
            f"sched.milestones must be increasing, got {self.milestones}",
        )


@dataclass
class ProfileConfig:
    enabled: bool = _doc(
        "torch.profiler over a few steps of the first epoch: run.dir/profile/ gets a Chrome/Perfetto "
        "trace and the top operators/kernels (table and JSON), per rank",
        default=False,
    )
    skip: int = _doc(
        "steps before profiling starts (>= 1: the first step compiles and warms up)", default=5
    )
    steps: int = _doc("steps recorded (a shorter first epoch records what it has)", default=5)

    def __post_init__(self) -> None:
        _require(
            self.skip >= 1,
            f"train.profile.skip must be >= 1 (the first step compiles), got {self.skip}",
        )
        _require(self.steps >= 1, f"train.profile.steps must be >= 1, got {self.steps}")


@dataclass
class TrainConfig:
    epochs: int = _doc("training epochs", default=100)
    device: Literal["auto", "cuda", "cpu"] = _doc("auto = CUDA when available", default="auto")
    amp: Literal["auto", "bf16", "fp16", "off"] = _doc(
        "autocast: auto = bf16 where supported (CPU included), else fp16 with GradScaler",
        default="auto",
    )
    channels_last: bool = _doc("channels_last memory format for models and batches", default=True)
    compile: bool = _doc("torch.compile the student step and the teacher", default=True)
    compile_mode: Literal[
        "default", "max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs"
    ] = _doc(
        "torch.compile mode; the CUDA-graph modes (reduce-overhead, max-autotune) are not yet verified on a GPU",
        default="default",
    )
    log_every: int = _doc(
        "steps between progress lines and step records in metrics.jsonl", default=50
    )
    eval_every: int = _doc(
        "epochs between evaluations (the last epoch is always evaluated)", default=1
    )
    max_steps_per_epoch: int = _doc(
        "cap on steps per epoch; 0 = the full epoch (smoke tests, benchmarks)", default=0
    )
    checkpoint_minutes: float = _doc(
        "also write last.pt (with the exact step) this often inside epochs, besides every "
        "epoch's end and on SIGTERM/SIGINT; 0 = only those",
        default=30.0,
    )
    sync_bn: bool = _doc("SyncBatchNorm for the student under DDP", default=False)
    profile: ProfileConfig = _doc(
        "torch.profiler over a few steps (fastkd/profiling.py)", default_factory=ProfileConfig
    )
    nvtx: bool = _doc(
        "NVTX ranges around each step's phases (fastkd/teacher, student_forward, loss, backward, "
        "optimizer) for Nsight Systems (nsys profile --trace=cuda,nvtx); free when no tool listens",
        default=False,
    )
    diagnostics: bool = _doc(
        "distillation diagnostics in step/epoch records and progress lines: the teacher's "
        "train top-1 and, for WSLD, the distribution of w (mean, p10/p50/p90), the fraction of "
        "regularization samples (CE_s < CE_t) and mean w on them vs the rest "
        "(fastkd/diagnostics.py)",
        default=True,
    )
    tensorboard: bool = _doc(
        "also write every numeric metrics.jsonl field as a TensorBoard scalar to "
        "run.dir/tensorboard (needs the tensorboard package)",
        default=False,
    )

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(self.eval_every >= 1, f"train.eval_every must be >= 1, got {self.eval_every}")
        _require(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch must be >= 0")
        _require(
            math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0,
            f"train.checkpoint_minutes must be a number >= 0 (0 = epoch ends only), got "
            f"{self.checkpoint_minutes}",
        )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Check what a run needs beyond each section's own ranges; raise `ConfigError` if not met.

        Each section checks its own fields in ``__post_init__``, so it is in range however it
        was made (from YAML, or in code by tests and benchmarks). Two kinds of check cannot live
        there and come here: checks across sections, and requirements that a
        default misses on purpose. ``data.root`` has no sensible default, yet ``Config()`` and
        ``DataConfig()`` must stay constructible (tests, benchmarks, `describe`), so its check
        waits until here. `from_dict`, and so `load_config`, calls this: every config read from
        YAML or overrides has passed it.
        """
        _require(bool(self.data.root), DATA_ROOT_EMPTY)
        _require(
            self.loss.kind == "ce" or bool(self.teacher.weights),
            f"teacher.weights is empty but loss.kind={self.loss.kind} needs a trained teacher: "
            "pass a state dict / fastkd checkpoint path or torchvision:WEIGHTS_NAME",
        )


# ---------------------------------------------------------------------------------------------
# Reading YAML
# ---------------------------------------------------------------------------------------------


class _CoreSchemaLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core-schema scalars (see the module docstring)."""


# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), replacing the
# YAML 1.1 bool (yes/no/on/off...), int (octal 010, 1:30 sexagesimal), float (needs a dot) and
# timestamp resolvers that yaml.SafeLoader registers.
_REPLACED_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
_CoreSchemaLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
):
    _CoreSchemaLoader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first)
    )


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    # yaml's own constructor reads a leading 0 as octal (YAML 1.1); 1.2 writes octal as 0o.
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)


_CoreSchemaLoader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)


class _UnambiguousDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes every string a YAML 1.1 or 1.2 reader would take for
    something else (``'1e3'``, ``'0o17'``, ``'off'``, ``'010'``), so that what it writes reads
    back the same with `load_yaml` and with any YAML 1.1 tool."""


_UnambiguousDumper.yaml_implicit_resolvers = {
    first: list(yaml.SafeDumper.yaml_implicit_resolvers.get(first, []))
    + list(_CoreSchemaLoader.yaml_implicit_resolvers.get(first, []))
    for first in set(yaml.SafeDumper.yaml_implicit_resolvers)
    | set(_CoreSchemaLoader.yaml_implicit_resolvers)
}


def dump_yaml(data: Any) -> str:
    """YAML text of plain data (keys in order) that `load_yaml` reads back unchanged."""
    return yaml.dump(data, Dumper=_UnambiguousDumper, sort_keys=False)


def load_yaml(text: str) -> Any:
    """Parse YAML text with core-schema scalars; never constructs arbitrary Python objects."""
    return yaml.load(text, Loader=_CoreSchemaLoader)  # a SafeLoader subclass: no code runs


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path} (check the path given to --config or _base_)"
        )
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and its ``_base_`` files (relative to it) into one merged mapping."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"_base_ inheritance cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    data = _rename_deprecated(data, f" in {path}")
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_chain, path)))
    return deep_merge(merged, data)


# ---------------------------------------------------------------------------------------------
# Renamed keys
# ---------------------------------------------------------------------------------------------

# Backend-specific keys grouped into sections: old dotted key -> new dotted key. The old keys are
# read for one release, each with a FutureWarning, and never written (config.yaml,
# --print-config and `describe` know the new keys only).
RENAMED_KEYS: dict[str, str] = {
    "data.dali_device": "data.dali.device",
    "data.hw_decoder_load": "data.dali.hw_decoder_load",
    "data.dali_preallocate": "data.dali.preallocate",
    "train.profile": "train.profile.enabled",
    "train.profile_skip": "train.profile.skip",
    "train.profile_steps": "train.profile.steps",
}
_OLD_KEYS: dict[str, str] = {new: old for old, new in RENAMED_KEYS.items()}


def _is_old_key(key: str, value: Any) -> bool:
    """Whether ``value`` given at dotted ``key`` is an old key's value.

    ``train.profile`` is both the old bool and the new section: a mapping (or nothing) given
    there is the section.
    """
    new = RENAMED_KEYS.get(key)
    if new is None:
        return False
    return not (new.startswith(key + ".") and (value is None or isinstance(value, dict)))


def _leaf_type(key: str) -> Any:
    tp: Any = Config
    for part in key.split("."):
        tp = _field_types(tp)[part]
    return tp


def _check_same_value(old: str, old_value: Any, new_value: Any, where: str) -> None:
    """A `ConfigError` naming both keys when an old key and its new key disagree."""
    new = RENAMED_KEYS[old]
    tp = _leaf_type(new)
    if _coerce(old_value, tp, old) != _coerce(new_value, tp, new):
        raise ConfigError(
            f"{old} (deprecated) and {new} are both given{where}, with different values "
            f"({old_value!r} and {new_value!r}): keep {new} only"
        )


def _warn_renamed(old: str, where: str) -> None:
    warnings.warn(
        f"config key {old} is deprecated{where}: write {RENAMED_KEYS[old]} instead (the old key "
        "stops working in the next release)",
        FutureWarning,
        stacklevel=3,
    )


def _rename_deprecated(tree: dict[str, Any], where: str) -> dict[str, Any]:
    """``tree`` (one file's mapping, or one given to `from_dict`) with old keys at their new places.

    Each old key found warns once; an old key next to its new key with another value is a
    `ConfigError` naming both. ``tree`` itself is left unchanged.
    """
    found = []
    for old in RENAMED_KEYS:
        *parents, leaf = old.split(".")
        section: Any = tree
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and leaf in section and _is_old_key(old, section[leaf]):
            found.append((parents, leaf, old))
    if not found:
        return tree
    tree = copy.deepcopy(tree)
    for parents, leaf, old in found:
        value = _section_at(tree, parents, where).pop(leaf)
        *new_parents, new_leaf = RENAMED_KEYS[old].split(".")
        section = _section_at(tree, new_parents, where)
        if new_leaf in section:
            _check_same_value(old, value, section[new_leaf], where)
        else:
            section[new_leaf] = value
        _warn_renamed(old, where)
    return tree


def _section_at(tree: dict[str, Any], parts: list[str], where: str) -> dict[str, Any]:
    """The mapping at ``parts`` in ``tree``, created where missing."""
    section = tree
    for depth, part in enumerate(parts):
        child = section.get(part)
        if child is None:
            child = section[part] = {}
        if not isinstance(child, dict):
            key = ".".join(parts[: depth + 1])
            raise ConfigError(f"{key}: expected a mapping of keys{where}, got {child!r}")
        section = child
    return section


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and its value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {text!r} is not of the form dotted.key=value (e.g. optim.lr=0.2)"
        )
    if raw.strip() == "":
        value: Any = ""
    else:
        try:
            value = load_yaml(raw)
        except yaml.YAMLError:
            value = raw  # an unparseable value is taken as a plain string; validation judges it
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty component in key {key!r}")
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw mapping (validation happens afterwards).

    An old key (`RENAMED_KEYS`) sets its new key, with a warning; an old key and its new key
    both among the overrides with different values are a `ConfigError`.
    """
    tree = dict(tree)
    # Values given to each renamed key under its old and under its new name, by new name.
    as_old: dict[str, Any] = {}
    as_new: dict[str, Any] = {}
    for text in overrides:
        parts, value = parse_override(text)
        key = ".".join(parts)
        if _is_old_key(key, value):
            _warn_renamed(key, f" in override {text!r}")
            key = RENAMED_KEYS[key]
            parts = key.split(".")
            as_old[key] = value
        elif key in _OLD_KEYS:
            as_new[key] = value
        if key in as_old and key in as_new:
            _check_same_value(_OLD_KEYS[key], as_old[key], as_new[key], " as overrides")
        node = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: depth + 1])} is not a section"
                )
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return tree


# ---------------------------------------------------------------------------------------------
# Validation into dataclasses
# ---------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``, reading it as a person means it.

    Ints are accepted where floats are, and so is every string ``float()`` parses; bool fields
    take the words true/false/yes/no/on/off; a choice among words that include ``off``/``on``
    takes a YAML boolean as that word (``train.amp: off`` written in a YAML 1.1 tool).
    """
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{extra}"
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation on {key}: {tp}")
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value, 10)  # "1_000" as Python reads it
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric run.dir suffix
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation on {key}: {tp}")


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1, cutoff=0.5)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{parent}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint} (valid here: {', '.join(valid)})")


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    types_by_name = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_by_name:
            raise _unknown_key(dotted, list(types_by_name), where)
        tp = types_by_name[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, where)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def from_dict(tree: dict[str, Any], where: str = "") -> Config:
    """Validate a raw mapping into a `Config` (raises `ConfigError` naming the bad key)."""
    cfg = _build(Config, _rename_deprecated(tree, where), "", where)
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (with its ``_base_`` chain), apply dotted ``overrides`` and validate."""
    tree = apply_overrides(load_yaml_tree(path), list(overrides or []))
    return from_dict(tree, where=f" in {path} or its overrides")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain Python data (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML; loading it back gives an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_yaml(to_dict(cfg)))
    tmp.replace(path)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field, for ``python -m fastkd.config``."""
    rows: list[tuple[str, str, str, str]] = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            rows.append(
                (key, _type_name(tp), repr(getattr(defaults, f.name)), f.metadata.get("doc", ""))
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print every config key with its type, default and documentation."""
    del argv
    rows = describe()
    width = max(len(r[0]) for r in rows)
    for key, tp, default, doc in rows:
        print(f"{key.ljust(width)}  {doc}\n{'':{width}}  type: {tp}; default: {default}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
