"""No host synchronization per training step: every device read of an epoch happens at a log line.

One harness, two detectors. On the CPU nothing really synchronizes, so every way Python reads a
tensor's value (``item``, ``tolist``, ``bool``/``float``/``int``, ``numpy``) and
``fastkd.meter.sync`` (wherever it is called from) are counted. On CUDA (``gpu``-marked, run by benchmarks/gpu_check.sh) CUDA's own
sync debug mode reports every synchronizing call, including those inside PyTorch (optimizer, grad
scaler). Each read is tagged with the step the loop is on.

This file uses no shared fixtures (gpu_check.sh runs it with ``--noconftest``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fastkd import engine, meter
from fastkd.builders import build_models, build_train_state
from fastkd.config import from_dict
from fastkd.control import RunControl, StopSignals
from fastkd.distributed import DistInfo
from fastkd.engine import Precision, resolve_precision
from fastkd.logging import MetricsWriter

STEPS, LOG_EVERY, CLASSES = 11, 4, 4
# Step 1 is the compile/warm-up step, timed with one sync; log lines at steps 4 and 8 and at the
# epoch's last step (11), which also ends the epoch (a sync and the epoch's totals).
STEPS_THAT_MAY_READ = [1, 4, 8, 11]

Detector = Callable[[Callable[[str], None]], contextlib.AbstractContextManager]


def tagged(batches: list, position: list[int]) -> Iterator:
    """Yield ``batches``, keeping ``position[0]`` at the 1-based index of the batch in use and
    at ``len(batches) + 1`` once the loop has asked past the last one."""
    for index, batch in enumerate(batches, start=1):
        position[0] = index
        yield batch
    position[0] = len(batches) + 1


def epoch_reads(
    tmp_path: Path, device: torch.device, precision: Precision, detector: Detector, **sections
) -> list[tuple[str, int]]:
    """Train one epoch of STEPS in-memory batches; returns (what, step) for each device read."""
    tree = {
        "run": {"dir": str(tmp_path / "run"), "seed": 0},
        "data": {"root": str(tmp_path), "batch_size": 8},
        "teacher": {"arch": "resnet18", "weights": "random"},
        "student": {"arch": "resnet18"},
        "loss": {"kind": "wsld", "tau": 2.0},
        "optim": {"lr": 0.05},
        "sched": {"kind": "constant"},
        "train": {"epochs": 1, "compile": False, "log_every": LOG_EVERY, "amp": "off"},
    }
    for section, values in sections.items():
        tree[section] = {**tree[section], **values}
    cfg = from_dict(tree)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="teacher uses random weights")
        models = build_models(cfg, CLASSES, dist)
    state = build_train_state(
        cfg,
        models,
        dist=dist,
        precision=precision,
        steps_per_epoch=STEPS,
        metrics=MetricsWriter(tmp_path, enabled=False),
    )
    assert state.scaler.is_enabled() == precision.use_scaler
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(8, 3, 32, 32, generator=gen)
            .to(device)
            .contiguous(memory_format=torch.channels_last),
            (torch.arange(8) % CLASSES).to(device),
        )
        for _ in range(STEPS)
    ]
    step = [0]
    reads: list[tuple[str, int]] = []
    # The trainer's decision after every step (signals, timed checkpoints, divergence), taken
    # and not acted on (fp16 on the CPU overflows these random networks: a NaN loss).
    control = RunControl(dist, StopSignals(), checkpoint_minutes=30)

    def after_step(step_in_epoch: int) -> None:
        control.after_step(diverged=state.meter.nonfinite is not None)

    with detector(lambda what: reads.append((what, step[0]))):
        result = engine.train_one_epoch(
            state, tagged(batches, step), epoch=1, epochs=1, steps=STEPS, after_step=after_step
        )
    assert result["img_per_s"] > 0
    return reads


@contextlib.contextmanager
def python_reads(record: Callable[[str], None]) -> Iterator[None]:
    """Counts Python-level reads of tensor values and device syncs (the CPU detector)."""
    with pytest.MonkeyPatch.context() as patch:

        def counting(name: str, original: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                record(name)
                return original(*args, **kwargs)

            return wrapper

        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        for module in (engine, meter):  # every module that calls it by its own name
            patch.setattr(module, "sync", counting("sync", meter.sync))
        yield


@contextlib.contextmanager
def cuda_syncs(record: Callable[[str], None]) -> Iterator[None]:
    """CUDA's sync debug mode, its warnings turned into records (the GPU detector)."""
    previous = torch.cuda.get_sync_debug_mode()
    original_showwarning = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            record(str(message).splitlines()[0][:120])
        else:
            original_showwarning(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


FP16_SCALER = Precision("fp16", torch.float16, use_scaler=True)


@pytest.mark.parametrize(
    ("loss_kind", "precision"),
    [("wsld", "fp32"), ("kd", "fp32"), ("ce", "fp32"), ("wsld", "fp16+scaler")],
)
def test_cpu_epoch_reads_values_only_at_log_lines(loss_kind, precision, tmp_path):
    """ "fp16+scaler" is the V100 path (fp16 autocast and a GradScaler, forced here on the CPU):
    the fused optimizer takes the scaler's inf check on the device, where an unfused one would
    make ``GradScaler.step`` call ``.item()`` every step (test_unfused_optimizer_... below)."""
    cpu = torch.device("cpu")
    chosen = FP16_SCALER if precision == "fp16+scaler" else resolve_precision("off", cpu)
    reads = epoch_reads(tmp_path, cpu, chosen, python_reads, loss={"kind": loss_kind})
    assert sorted({step for _, step in reads}) == STEPS_THAT_MAY_READ, reads
    assert [what for what, step in reads if step == LOG_EVERY] == ["tolist"], reads


def test_unfused_optimizer_with_fp16_scaling_reads_every_step(tmp_path):
    """The detector sees a real per-step read: GradScaler.step with an unfused SGD."""
    with pytest.warns(UserWarning, match="synchronizes the host"):
        reads = epoch_reads(
            tmp_path, torch.device("cpu"), FP16_SCALER, python_reads, optim={"fused": "off"}
        )
    assert sorted({step for _, step in reads}) == list(range(1, STEPS + 1)), reads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["auto", "fp16+scaler"])
def test_cuda_epoch_synchronizes_only_at_log_lines(precision, tmp_path):
    cuda = torch.device("cuda", torch.cuda.current_device())
    chosen = FP16_SCALER if precision == "fp16+scaler" else resolve_precision("auto", cuda)
    reads = epoch_reads(tmp_path, cuda, chosen, cuda_syncs)
    steps = sorted({step for _, step in reads})
    assert set(steps) <= set(STEPS_THAT_MAY_READ), reads
    assert LOG_EVERY in steps, f"the sync detector saw no log-line read: {reads}"


def test_cpu_evaluate_reads_values_once_after_the_last_batch():
    """Evaluation accumulates hits and loss on the device and reads them back once, at the end."""
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, CLASSES))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 2, 2, generator=gen), torch.arange(5) % CLASSES)] * 4
    batch = [0]
    reads: list[tuple[str, int]] = []
    with python_reads(lambda what: reads.append((what, batch[0]))):
        result = engine.evaluate(model, tagged(batches, batch), resolve_precision("off", cpu), cpu)
    assert result["num_images"] == 20
    assert reads == [("tolist", len(batches) + 1)], reads
