"""Engine wiring: precision choice, optimizer selection (apex optional), schedules, evaluation counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastkd import engine
from fastkd.config import ConfigError, OptimConfig, SchedConfig
from fastkd.engine import Precision, build_optimizer, evaluate, lr_factor, resolve_precision

CPU = torch.device("cpu")


def test_precision_on_cpu(monkeypatch):
    assert resolve_precision("off", CPU) == Precision("fp32", None, False)
    assert resolve_precision("bf16", CPU).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", CPU)
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", CPU).dtype is torch.bfloat16
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", CPU).dtype is None  # fp32 where bf16 is slow


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    # What torch really answers on a V100: its default counts emulated bf16 as supported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return torch.device("cuda", 0)


def test_precision_on_a_v100_uses_fp16_and_a_scaler_not_emulated_bf16(monkeypatch):
    cuda = _fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    p = resolve_precision("auto", cuda)
    assert p.dtype is torch.float16 and p.use_scaler
    assert "V100" in p.reason and "sm_70" in p.reason and "no native bf16" in p.reason
    with pytest.raises(ConfigError, match="V100.*no native bf16"):
        resolve_precision("bf16", cuda)
    assert resolve_precision("fp16", cuda).use_scaler
    assert resolve_precision("off", cuda).dtype is None


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0)])
def test_precision_on_ampere_and_newer_is_bf16(monkeypatch, capability):
    cuda = _fake_gpu(monkeypatch, "NVIDIA H100", capability)
    p = resolve_precision("auto", cuda)
    assert p.dtype is torch.bfloat16 and not p.use_scaler
    assert f"sm_{capability[0]}{capability[1]}" in p.reason
    assert resolve_precision("bf16", cuda).dtype is torch.bfloat16
    assert resolve_precision("fp16", cuda).dtype is torch.float16  # asked for, still honoured


def test_peak_flops_is_measured_in_the_runs_dtype(monkeypatch):
    """MFU's denominator uses the AMP dtype in use (fp16 on a V100), not always bf16."""
    seen = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: seen.append(k["dtype"]) or torch.ones(1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    cuda = torch.device("cuda", 0)
    assert engine.measure_peak_flops(CPU, torch.bfloat16) is None and not seen
    engine.measure_peak_flops(cuda, torch.float16)
    engine.measure_peak_flops(cuda, None)
    assert seen == [torch.float16] * 2 + [torch.float32] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_precision_matches_this_gpus_bf16_units():
    """On a real GPU: bf16 from sm_80, fp16 with a scaler below; the MFU peak in that dtype."""
    cuda = torch.device("cuda", 0)
    major, minor = torch.cuda.get_device_capability(cuda)
    p = resolve_precision("auto", cuda)
    assert (p.dtype, p.use_scaler) == (
        (torch.bfloat16, False) if major >= 8 else (torch.float16, True)
    )
    assert f"sm_{major}{minor}" in p.reason
    assert engine.measure_peak_flops(cuda, p.dtype) > 1e12


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_optimizer_auto_uses_torch_fused():
    opt, name = build_optimizer(_model(), OptimConfig(), CPU)
    assert "fused" in name and opt.defaults.get("fused") is True


def test_optimizer_off_is_unfused():
    opt, name = build_optimizer(_model(), OptimConfig(fused="off"), CPU)
    assert "unfused" in name and not opt.defaults.get("fused")


def test_optimizer_apex_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(engine, "_import_apex_fused_sgd", lambda: None)
    with pytest.raises(ConfigError, match="apex"):
        build_optimizer(_model(), OptimConfig(fused="apex"), CPU)


def test_optimizer_apex_selected_when_importable(monkeypatch):
    class FakeFusedSGD(torch.optim.SGD):
        pass

    monkeypatch.setattr(engine, "_import_apex_fused_sgd", lambda: FakeFusedSGD)
    with pytest.raises(ConfigError, match="CUDA"):
        build_optimizer(_model(), OptimConfig(fused="apex"), CPU)
    opt, name = build_optimizer(_model(), OptimConfig(fused="apex"), torch.device("cuda", 0))
    assert isinstance(opt, FakeFusedSGD) and name == "apex FusedSGD"


def test_no_norm_weight_decay_groups():
    opt, _ = build_optimizer(_model(), OptimConfig(norm_weight_decay=False, weight_decay=0.1), CPU)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    assert all(p.ndim <= 1 for p in opt.param_groups[1]["params"])


def test_step_schedule_with_warmup():
    cfg = SchedConfig(
        kind="step", milestones=[2, 4], gamma=0.1, warmup_epochs=1, warmup_start_factor=0.1
    )
    f = lambda step: lr_factor(step, cfg=cfg, base_lr=0.1, epochs=6, steps_per_epoch=10)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1)
    assert f(40) == pytest.approx(0.01)


def test_cosine_schedule_ends_at_min_lr():
    cfg = SchedConfig(kind="cosine", min_lr=0.001)
    f = lambda step: lr_factor(step, cfg=cfg, base_lr=0.1, epochs=5, steps_per_epoch=4)  # noqa: E731
    assert f(0) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.5 * (1 + 0.01), rel=1e-6)
    assert f(20) == pytest.approx(0.01)
    values = [f(s) for s in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_scheduler_drives_the_optimizer():
    model = _model()
    opt, _ = build_optimizer(model, OptimConfig(lr=0.4), CPU)
    sched = engine.build_scheduler(
        opt, SchedConfig(kind="step", milestones=[1]), base_lr=0.4, epochs=2, steps_per_epoch=3
    )
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.4, 0.4, 0.4, 0.04])


class _FixedLogits(nn.Module):
    """Returns per-sample logits looked up by the sample id stored in the image's first pixel."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.batch_sizes: list[int] = []

    def forward(self, images):
        self.batch_sizes.append(images.shape[0])
        return self.table[images[:, 0, 0, 0].long()]


@pytest.mark.parametrize(("pad_to", "seen"), [(None, [3, 3, 1]), (3, [3, 3, 3]), (5, [5, 5, 5])])
def test_evaluate_counts_every_image_once_and_topk(pad_to, seen):
    # 7 samples, 6 classes; logits chosen so top-1 hits 3 and top-5 hits 6 of 7.
    table = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5],  # label 0: top1 hit
            [1, 9, 2, 3, 4, 5],  # label 1: top1 hit
            [1, 2, 9, 3, 4, 5],  # label 2: top1 hit
            [9, 8, 7, 6, 5, 0],  # label 5: lowest score, top5 miss
            [9, 8, 7, 6, 5, 0],  # label 4: top5 hit
            [5, 4, 3, 2, 1, 0],  # label 1: top5 hit
            [0, 1, 2, 3, 4, 5],  # label 1: top5 hit
        ],
        dtype=torch.float32,
    )
    labels = torch.tensor([0, 1, 2, 5, 4, 1, 1])
    ids = torch.arange(7, dtype=torch.float32)
    images = ids[:, None, None, None].expand(7, 3, 2, 2).contiguous()
    batches = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, 7, 3)]  # 3 + 3 + 1
    model = _FixedLogits(table)
    result = evaluate(model, batches, Precision("fp32", None, False), CPU, pad_to=pad_to)
    assert model.batch_sizes == seen  # padded batches: the model sees one shape only
    assert result["num_images"] == 7
    assert result["top1"] == pytest.approx(3 / 7)
    assert result["top5"] == pytest.approx(6 / 7)
    expected_loss = nn.functional.cross_entropy(table, labels).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert math.isfinite(result["loss"])


def test_pad_batch_keeps_rows_and_memory_format():
    images = torch.randn(3, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    padded = engine.pad_batch(images, 5)
    assert padded.shape == (5, 3, 4, 4)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:3], images) and torch.equal(padded[3], images[2])
    assert engine.pad_batch(images, 3) is images and engine.pad_batch(images, 2) is images


def test_compiled_evaluate_with_padding_compiles_one_graph():
    """A shard's short last batch must not recompile the compiled student (issue: fixed shapes)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    images = torch.randn(10, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(10) % 5
    batches = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]  # 4 + 4 + 2
    fp32 = Precision("fp32", None, False)
    expected = evaluate(net, batches, fp32, CPU)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net)
    result = evaluate(compiled, batches, fp32, CPU, pad_to=4)
    assert counters["stats"]["unique_graphs"] == 1
    assert result["num_images"] == 10
    assert result == pytest.approx(expected, rel=1e-5)
    torch._dynamo.reset()


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_evaluate_records_no_autograd_graph():
    """Every evaluation forward runs without autograd: no output requires grad, no graph kept."""
    net = _small_net()  # parameters require grad, as the student's do during training
    seen = []
    net.register_forward_hook(
        lambda module, args, out: seen.append(
            (out.requires_grad, out.grad_fn is not None, torch.is_grad_enabled())
        )
    )
    batches = [(torch.randn(4, 3, 8, 8), torch.arange(4) % 5) for _ in range(2)]
    result = evaluate(net, batches, Precision("fp32", None, False), CPU)
    assert result["num_images"] == 8
    assert seen == [(False, False, False)] * 2
    assert all(p.requires_grad for p in net.parameters())  # the model is left trainable
    # Training right after evaluation still works (nothing leaked from inference mode).
    net.train()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_compiled_evaluate_gets_a_forward_only_graph():
    """With train.compile the eval model is compiled as an inference graph, not forward+backward."""
    from torch._dynamo.backends.common import aot_autograd

    compiled_as: list[str] = []

    def recorder(kind):
        def compiler(graph_module, example_inputs):
            compiled_as.append(kind)
            return graph_module.forward

        return compiler

    backend = aot_autograd(
        fw_compiler=recorder("training forward"),
        bw_compiler=recorder("backward"),
        inference_compiler=recorder("inference"),
    )
    net = _small_net().eval()
    batches = [(torch.randn(4, 3, 8, 8), torch.arange(4) % 5) for _ in range(2)]
    torch._dynamo.reset()
    try:
        evaluate(torch.compile(net, backend=backend), batches, Precision("fp32", None, False), CPU)
    finally:
        torch._dynamo.reset()
    assert compiled_as == ["inference"]


def test_step_flops_count_teacher_forward_and_student_train():
    import torchvision

    student = torchvision.models.resnet18(num_classes=10)
    teacher = torchvision.models.resnet34(num_classes=10).eval()
    only_student = engine.count_step_flops(student, None, 32, CPU)
    both = engine.count_step_flops(student, teacher, 32, CPU)
    teacher_forward = both - only_student
    # A training step costs ~3x a forward pass; ResNet-34 forward is ~2x ResNet-18's.
    assert 1.5 < teacher_forward / (only_student / 3) < 2.5
    assert all(p.grad is None for p in student.parameters())
    # Counting leaves no trace in the student: BatchNorm statistics are untouched.
    fresh = torchvision.models.resnet18(num_classes=10)
    for (name, counted), (_, untouched) in zip(
        student.named_buffers(), fresh.named_buffers(), strict=True
    ):
        torch.testing.assert_close(counted, untouched, msg=name)
