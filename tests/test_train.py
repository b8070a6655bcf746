"""End-to-end trainer behaviour on the tiny synthetic set: learning, run files, resume, eval, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from fastkd import checkpoint as ckpt_io
from fastkd import diagnostics, engine
from fastkd.builders import build_models, build_train_state
from fastkd.config import ConfigError, load_config
from fastkd.distributed import DistInfo
from fastkd.engine import evaluate, resolve_precision, train_step
from fastkd.eval import evaluate_checkpoint
from fastkd.eval import main as eval_main
from fastkd.logging import MetricsWriter, read_metrics
from fastkd.models import ModelError
from fastkd.trainer import run

REPO = Path(__file__).resolve().parent.parent
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_config(tmp_path: Path, root: Path, **sections) -> Path:
    """A small CPU config on ``root``; keyword arguments replace whole sections' keys."""
    data = {
        "run": {"dir": str(tmp_path / "run"), "seed": 0},
        "data": {
            "root": str(root),
            "image_size": 32,
            "val_resize": 36,
            "batch_size": 8,
            "workers": 1,
        },
        "teacher": {"arch": "resnet18", "weights": "random"},
        "student": {"arch": "resnet18"},
        "loss": {"kind": "ce"},
        "optim": {"lr": 0.05},
        "sched": {"kind": "constant"},
        "train": {"epochs": 2, "compile": False, "log_every": 1, "amp": "off"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("kind", ["ce", "kd", "wsld"])
def test_steps_lower_the_loss_on_a_fixed_batch(kind, tiny_imagefolder, tmp_path):
    """A handful of SGD steps on one batch must reduce the objective (every loss kind).

    The learning rate is small because train-mode BatchNorm on 8 random images makes a ResNet's
    logits very sensitive to its weights (plain PyTorch oscillates there at lr 0.01 too).
    """
    cfg = load_config(
        write_config(
            tmp_path, tiny_imagefolder, loss={"kind": kind, "tau": 2.0}, optim={"lr": 0.001}
        )
    )
    precision = resolve_precision("off", CPU.device)
    models = build_models(cfg, 4, CPU)
    state = build_train_state(
        cfg,
        models,
        dist=CPU,
        precision=precision,
        steps_per_epoch=10,
        metrics=MetricsWriter(tmp_path, enabled=False),
    )
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8) % 4
    losses = [float(train_step(state, images, labels)[0]["loss"]) for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0], losses
    if kind != "ce":
        # The teacher is frozen: no gradients, eval mode, weights unchanged by the steps.
        assert all(p.grad is None and not p.requires_grad for p in models.teacher.parameters())
        assert not models.teacher.training


def test_training_writes_the_run_folder(tiny_imagefolder, tmp_path):
    config = write_config(tmp_path, tiny_imagefolder, loss={"kind": "wsld"}, train={"epochs": 2})
    summary = run(load_config(config))
    run_dir = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "student.pt",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    # config.yaml is the fully resolved config and loads back to the same thing.
    assert load_config(run_dir / "config.yaml") == load_config(config)
    records = read_metrics(run_dir)
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
        assert r["loss"] > 0 and r["img_per_s"] > 0
    steps = [r for r in records if r["event"] == "step"]
    assert steps and all(
        {"lr", "loss", "ce", "wsld", "wsld_weight", "img_per_s", "data_wait_frac"} <= r.keys()
        for r in steps
    )
    assert all(0.0 <= r["wsld_weight"] <= 1.0 for r in steps)
    # train.diagnostics (default on): per interval in step records, per epoch in epoch records.
    for r in steps + epochs:
        assert 0.0 <= r["w_p10"] <= r["w_p50"] <= r["w_p90"] <= 1.0, r
        assert 0.0 <= r["reg_frac"] <= 1.0 and 0.0 <= r["teacher_train_top1"] <= 1.0, r
        assert 0.0 <= r["w_mean"] <= 1.0, r
    for r in epochs:  # the epoch's mean w is the running mean of the loss term wsld_weight
        assert r["w_mean"] == pytest.approx(r["wsld_weight"], rel=1e-5)
    # student.pt loads straight into the torchvision model and reproduces the summary's accuracy.
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True))
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["top1"] == pytest.approx(summary["top1"])
    assert on_disk["num_val_images"] == 20
    # last.pt is a full training checkpoint.
    state = ckpt_io.load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 2 and state["classes"] == summary["classes"]
    assert {"optimizer", "scheduler", "student", "config"} <= state.keys()


@pytest.mark.parametrize(("profile_steps", "recorded", "nvtx"), [(1, 1, False), (5, 2, True)])
def test_profile_writes_trace_and_top_ops(
    tiny_imagefolder, tmp_path, profile_steps, recorded, nvtx
):
    """train.profile records steps after the compile step and writes trace + tables once; an
    epoch shorter than the window (3 steps here) writes what it recorded and profiling stops.
    The step's phases are timed; NVTX ranges (train.nvtx) may wrap them too."""
    config = write_config(
        tmp_path,
        tiny_imagefolder,
        loss={"kind": "wsld"},
        train={
            "epochs": 2,
            "profile": {"enabled": True, "skip": 1, "steps": profile_steps},
            "nvtx": nvtx,
        },
    )
    run(load_config(config))
    profile_dir = tmp_path / "run" / "profile"
    assert sorted(p.name for p in profile_dir.iterdir()) == [
        "ops_rank0.json",
        "ops_rank0.txt",
        "trace_rank0.json",
    ]
    trace = json.loads((profile_dir / "trace_rank0.json").read_text())
    assert trace["traceEvents"]
    ops = json.loads((profile_dir / "ops_rank0.json").read_text())
    assert ops["steps"] == recorded and ops["device"] == "cpu"
    names = [op["name"] for op in ops["ops"]]
    assert any("conv" in name for name in names), names
    traced = {event.get("name") for event in trace["traceEvents"]}
    assert "fastkd::wsld_ce" in traced and "fastkd::wsld_backward" in traced  # the fused loss
    assert not any(name.startswith(("ProfilerStep", "fastkd/")) for name in names)
    assert [p["phase"] for p in ops["phases"]] and {p["phase"] for p in ops["phases"]} == set(
        engine.PHASES
    )
    assert all(p["cpu_ms_per_step"] > 0 for p in ops["phases"])
    assert all(op["self_cpu_us"] >= 0 and 0 <= op["share"] <= 1 for op in ops["ops"])
    records = read_metrics(tmp_path / "run")
    profiles = [r for r in records if r["event"] == "profile"]
    assert len(profiles) == 1 and profiles[0]["epoch"] == 1 and profiles[0]["steps"] == recorded
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 2 and all(r["img_per_s"] > 0 for r in epochs)


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny_imagefolder, tmp_path):
    """The default path (train.compile: student, teacher and the WSLD objective compiled, the
    fused op traced through its C++ autograd formula) computes the same step as eager: equal
    loss terms, equal parameter updates (so equal gradients), and the compiled evaluation
    model gives the bare student's logits."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8) % 4
    outcome = {}
    for compiled in (False, True):
        cfg = load_config(
            write_config(
                tmp_path / str(compiled),
                tiny_imagefolder,
                loss={"kind": "wsld", "tau": 2.0},
                train={"compile": compiled},
            )
        )
        models = build_models(cfg, 4, CPU)
        state = build_train_state(
            cfg,
            models,
            dist=CPU,
            precision=resolve_precision("off", CPU.device),
            steps_per_epoch=10,
            metrics=MetricsWriter(tmp_path, enabled=False),
        )
        before = {k: v.detach().clone() for k, v in models.student.named_parameters()}
        terms, _ = train_step(state, images, labels)
        deltas = {k: v.detach() - before[k] for k, v in models.student.named_parameters()}
        counts = terms.pop(diagnostics.COUNTS)  # the diagnostics' sums, compiled alike
        assert counts.shape == (5 + diagnostics.BINS,)
        outcome[compiled] = ({k: float(v) for k, v in terms.items()}, deltas, counts)
    # Evaluation through the compiled student equals the bare student on the same weights.
    models.eval_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            models.eval_model(images), models.student(images), rtol=1e-4, atol=1e-4
        )
    (eager_terms, eager_deltas, eager_counts) = outcome[False]
    (compiled_terms, compiled_deltas, compiled_counts) = outcome[True]
    assert compiled_terms == pytest.approx(eager_terms, rel=1e-4, abs=1e-6)
    # Rows, teacher hits and regularization samples are counts; a w within 1e-4 of a histogram
    # edge may land in the next bin.
    torch.testing.assert_close(compiled_counts[:5], eager_counts[:5], rtol=1e-4, atol=1e-4)
    assert (compiled_counts[5:] - eager_counts[5:]).abs().max() <= 1
    assert eager_deltas.keys() == compiled_deltas.keys()
    # The head's update follows straight from the loss gradient: tight. Deeper layers see it
    # through ~17 train-mode BatchNorms over 8 images (layer4 is 1x1 at 32 px), whose backward
    # amplifies inductor's reordered fp32 sums: eager vs compiled CE alone differ there by ~1%.
    for name, delta in eager_deltas.items():
        assert delta.norm() > 0, name  # every parameter was updated
        relative = float((compiled_deltas[name] - delta).norm() / delta.norm())
        assert relative < (1e-4 if name.startswith("fc.") else 5e-2), (name, relative)


def test_eval_counts_every_image_once_with_an_odd_batch(tiny_imagefolder, tmp_path):
    config = write_config(tmp_path, tiny_imagefolder, train={"epochs": 1})
    run(load_config(config))
    out = tmp_path / "eval.json"
    # 20 validation images, batch 3: the last batch holds 2.
    code = eval_main(
        [
            "--config",
            str(config),
            "data.val_batch_size=3",
            "--checkpoint",
            str(tmp_path / "run" / "student.pt"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 20
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    # The same weights evaluated through last.pt and with another batch size agree exactly.
    again = evaluate_checkpoint(
        load_config(config, ["data.val_batch_size=7"]), tmp_path / "run" / "last.pt"
    )
    assert again["num_images"] == 20
    assert again["top1"] == pytest.approx(result["top1"]) and again["top5"] == pytest.approx(
        result["top5"]
    )


def test_eval_matches_a_manual_count(tiny_imagefolder, tmp_path):
    """fastkd.eval's top-1 equals an argmax count over the torch loader's validation images."""
    from fastkd.data import build_val_loader

    config = write_config(tmp_path, tiny_imagefolder, train={"epochs": 1})
    run(load_config(config))
    cfg = load_config(config, ["data.backend=torch", "data.val_batch_size=5"])
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(tmp_path / "run" / "student.pt", weights_only=True))
    model.eval()
    hits = total = 0
    loader = build_val_loader(cfg.data, device=torch.device("cpu"))
    with torch.no_grad():
        for images, labels in loader:
            hits += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    loader.close()
    result = evaluate_checkpoint(cfg, tmp_path / "run" / "student.pt")
    assert total == result["num_images"] == 20
    assert result["top1"] == pytest.approx(hits / total)


def test_existing_run_is_never_overwritten_and_resume_continues(tiny_imagefolder, tmp_path):
    config = write_config(tmp_path, tiny_imagefolder, train={"epochs": 1})
    run(load_config(config))
    before = (tmp_path / "run" / "student.pt").read_bytes()
    with pytest.raises(ConfigError, match="run.resume=auto"):
        run(load_config(config))
    assert (tmp_path / "run" / "student.pt").read_bytes() == before
    summary = run(load_config(config, ["run.resume=auto", "train.epochs=2"]))
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "run") if r["event"] == "epoch"]
    assert epochs == [1, 2]  # the second run continued at epoch 2 instead of starting over
    assert ckpt_io.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2
    assert summary["epochs"] == 2


def test_resume_from_a_non_checkpoint_is_a_clear_error(tiny_imagefolder, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    config = write_config(tmp_path, tiny_imagefolder, run={"resume": str(bogus)})
    with pytest.raises(ckpt_io.CheckpointError, match="bogus.pt"):
        run(load_config(config))


def test_teacher_with_the_wrong_class_count_is_refused(tiny_imagefolder, tmp_path):
    weights = tmp_path / "teacher10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    config = write_config(
        tmp_path, tiny_imagefolder, loss={"kind": "wsld"}, teacher={"weights": str(weights)}
    )
    with pytest.raises(ModelError, match="10 classes"):
        run(load_config(config))


def test_teacher_architecture_mismatch_is_refused(tiny_imagefolder, tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), weights)
    config = write_config(
        tmp_path,
        tiny_imagefolder,
        loss={"kind": "wsld"},
        teacher={"arch": "resnet34", "weights": str(weights)},
    )
    with pytest.raises(ModelError, match="teacher.arch"):
        run(load_config(config))


def test_trained_teacher_is_loaded_and_evaluated(tiny_imagefolder, tmp_path):
    """A ce run's student.pt serves as the next run's teacher, and its accuracy is reported."""
    teacher_cfg = write_config(tmp_path / "t", tiny_imagefolder, train={"epochs": 1})
    teacher_summary = run(load_config(teacher_cfg))
    teacher_file = tmp_path / "t" / "run" / "student.pt"
    # fold_bn off: the teacher is then evaluated through the same unfolded fp32 path the ce run
    # used for its student, so the two measurements are equal on any CPU (folding would change
    # the rounding, and near-tie logits may flip differently on other instruction sets).
    student_cfg = write_config(
        tmp_path / "s",
        tiny_imagefolder,
        loss={"kind": "wsld"},
        teacher={"weights": str(teacher_file), "fold_bn": False},
        train={"epochs": 1},
    )
    summary = run(load_config(student_cfg))
    assert summary["teacher_weights"].startswith(f"torchvision-layout state dict {teacher_file} (")
    assert summary["teacher_top1"] == teacher_summary["top1"]


def test_evaluate_of_a_model_on_the_loader_counts_once(tiny_imagefolder, tmp_path):
    from fastkd.data import build_val_loader

    cfg = load_config(write_config(tmp_path, tiny_imagefolder), ["data.val_batch_size=6"])
    loader = build_val_loader(cfg.data, device=torch.device("cpu"))
    model = torchvision.models.resnet18(num_classes=4)
    result = evaluate(model, loader, resolve_precision("off", CPU.device), CPU.device)
    loader.close()
    assert result["num_images"] == 20


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["data.batchsize=3"], "did you mean 'data.batch_size'"),
        (["data.root=/nonexistent/imagenet"], "/nonexistent/imagenet"),
        (["student.arch=resnet19"], "resnet19"),
        (["loss.kind=wsld", "teacher.weights=/nonexistent/teacher.pt"], "/nonexistent/teacher.pt"),
        (
            ["train.profile=true", "train.profile.enabled=false"],
            "train.profile (deprecated) and train.profile.enabled are both given",
        ),
    ],
)
def test_cli_user_errors_are_one_line(tiny_imagefolder, tmp_path, args, fragment):
    config = write_config(tmp_path, tiny_imagefolder)
    result = run_cli("fastkd.train", "--config", str(config), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("fastkd: error:")]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.stderr


def test_cli_missing_config_file(tmp_path):
    result = run_cli("fastkd.train", "--config", str(tmp_path / "nope.yaml"))
    assert (
        result.returncode == 2 and "nope.yaml" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize("key", ["run.resume", "teacher.weights"])
def test_an_unreadable_file_is_a_one_line_error(key, tiny_imagefolder, tmp_path):
    """torch.load's own message runs to several lines of weights_only advice: the error about
    the file must stay one line, naming the file."""
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"very much not a checkpoint")
    config = write_config(tmp_path, tiny_imagefolder, loss={"kind": "wsld"})
    result = run_cli("fastkd.train", "--config", str(config), f"{key}={bogus}")
    assert result.returncode == 2, result.stderr
    error = result.stderr[result.stderr.index("fastkd: error:") :]
    assert error.rstrip("\n").count("\n") == 0 and str(bogus) in error, error


def test_cli_eval_missing_checkpoint(tiny_imagefolder, tmp_path):
    config = write_config(tmp_path, tiny_imagefolder)
    result = run_cli(
        "fastkd.eval", "--config", str(config), "--checkpoint", str(tmp_path / "missing.pt")
    )
    assert (
        result.returncode == 2
        and "missing.pt" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert "fastkd: error: --checkpoint" in result.stderr, (
        result.stderr
    )  # the flag, not a config key


def test_print_config(tiny_imagefolder, tmp_path):
    config = write_config(tmp_path, tiny_imagefolder)
    result = run_cli(
        "fastkd.train",
        "--config",
        str(config),
        "optim.lr=1e-3",
        "train.amp=off",
        "train.profile=true",
        "data.dali_device=cpu",
        "--print-config",
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)  # typed values, readable by any YAML tool
    assert printed["optim"]["lr"] == 0.001 and printed["train"]["amp"] == "off"
    # Old keys are read, with a warning a user sees by default, and printed under the new ones.
    assert printed["train"]["profile"]["enabled"] is True and "profile_skip" not in printed["train"]
    assert printed["data"]["dali"]["device"] == "cpu" and "dali_device" not in printed["data"]
    for old, new in [
        ("train.profile", "train.profile.enabled"),
        ("data.dali_device", "data.dali.device"),
    ]:
        assert f"FutureWarning: config key {old} is deprecated" in result.stderr
        assert f"write {new} instead" in result.stderr


@pytest.mark.parametrize(("fused", "warns"), [("auto", False), ("off", True)])
def test_fp16_scaler_with_an_optimizer_that_syncs_is_announced(
    fused, warns, tiny_imagefolder, tmp_path
):
    """fp16 + GradScaler with an optimizer that cannot take the inf check as a tensor (unfused
    SGD, apex FusedSGD) syncs every step: the run says so once, at setup."""
    cfg = load_config(write_config(tmp_path, tiny_imagefolder, optim={"lr": 0.05, "fused": fused}))
    models = build_models(cfg, 4, CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_train_state(
            cfg,
            models,
            dist=CPU,
            precision=engine.Precision("fp16", torch.float16, True),
            steps_per_epoch=3,
            metrics=MetricsWriter(tmp_path, enabled=False),
        )
    messages = [str(w.message) for w in caught if "synchronizes the host" in str(w.message)]
    assert len(messages) == int(warns), messages
    if warns:
        assert "torch SGD (unfused)" in messages[0] and "optim.fused=auto" in messages[0]


def test_srun_without_torchrun_starts_nothing(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """srun's N tasks would each be a world of one racing on run.dir: one error, no run."""
    from fastkd.train import main

    config = write_config(tmp_path, tiny_imagefolder)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert main(["--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "task 2 of 4 without torchrun" in error and "torchrun --nnodes" in error
    assert not (tmp_path / "run").exists()
    # torchrun under srun (or a wrapper that sets WORLD_SIZE) is a real multi-process launch,
    # and a batch script's single process (no step task count) is a world of one.
    from fastkd.distributed import check_launcher

    check_launcher({"SLURM_STEP_NUM_TASKS": "4", "WORLD_SIZE": "4"})
    check_launcher({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})
    check_launcher({"SLURM_STEP_NUM_TASKS": "1"})


def test_start_log_says_global_batch_lr_per_256_and_the_loss_implementation(
    tiny_imagefolder, tmp_path, caplog
):
    from fastkd.trainer import log_recipe

    cfg = load_config(write_config(tmp_path, tiny_imagefolder, loss={"kind": "wsld"}))
    four = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level("INFO", logger="fastkd"):
        assert log_recipe(cfg, four) == "wsld (fused C++ op (CPU kernels))"
    assert "global batch 32 (8 per process x 4), lr 0.05 = 0.4 per 256 images" in caplog.text
    reference = load_config(
        write_config(tmp_path, tiny_imagefolder, loss={"kind": "wsld", "impl": "reference"})
    )
    assert log_recipe(reference, CPU) == "wsld (reference (plain PyTorch))"
    assert log_recipe(load_config(write_config(tmp_path, tiny_imagefolder)), CPU) == "ce"
    # A warm-up as long as the run (a smoke run of a recipe with warm-up) is said, not refused.
    smoke = write_config(tmp_path, tiny_imagefolder, sched={"kind": "cosine", "warmup_epochs": 2})
    with pytest.warns(UserWarning, match="the whole run is warm-up"):
        log_recipe(load_config(smoke), CPU)


def test_a_gpu_build_without_the_cuda_kernel_warns_or_refuses(
    tiny_imagefolder, tmp_path, monkeypatch
):
    from fastkd.losses import ops
    from fastkd.trainer import log_recipe

    monkeypatch.setattr(ops, "_FUSED_DEVICE_TYPES", frozenset({"cpu"}))  # a CPU-only build
    gpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    cfg = load_config(write_config(tmp_path, tiny_imagefolder, loss={"kind": "wsld"}))
    with pytest.warns(UserWarning, match="reference implementation.*FASTKD_BUILD_CUDA=1"):
        assert log_recipe(cfg, gpu).startswith("wsld (reference")
    fused = load_config(
        write_config(tmp_path, tiny_imagefolder, loss={"kind": "wsld", "impl": "fused"})
    )
    with pytest.raises(ConfigError, match="loss.impl=fused but this fastkd._C has no cuda"):
        log_recipe(fused, gpu)


def test_a_failed_setup_releases_the_loaders_it_built(tiny_imagefolder, tmp_path, monkeypatch):
    """A setup that fails after the loaders exist (here: the models) closes them again: no DALI
    pipeline or DataLoader worker outlives the error."""
    import fastkd.trainer as trainer_module

    closed: list[str] = []
    real_build_loaders = trainer_module.build_loaders

    def recording_build_loaders(*args, **kwargs):
        loaders = real_build_loaders(*args, **kwargs)
        for name, loader in zip(("train", "val"), loaders, strict=True):
            original = loader.close
            loader.close = lambda name=name, original=original: (closed.append(name), original())
        return loaders

    def failing_build_models(*args, **kwargs):
        raise ModelError("student.arch=nope: no such architecture")

    monkeypatch.setattr(trainer_module, "build_loaders", recording_build_loaders)
    monkeypatch.setattr(trainer_module, "build_models", failing_build_models)
    config = write_config(tmp_path, tiny_imagefolder, train={"epochs": 1})
    with pytest.raises(ModelError, match="no such architecture"):
        run(load_config(config))
    assert sorted(closed) == ["train", "val"]
