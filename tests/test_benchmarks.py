"""The benchmark scripts and gpu_check.sh, run small on the CPU: their JSON, ratios and failure paths.

Numbers are not asserted (a shared CPU is noisy); what is checked is that every script runs end
to end, writes the documented JSON layout, and reports rather than hides what went wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_train  # noqa: E402


def run_script(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert {"benchmark", "machine", "config", "results"} <= set(data), data.keys()
    assert data["machine"]["command"]
    return data


# --- bench_train ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("eager/fp32/nchw", bench_train.Variant(False, None, False, False)),
        ("compiled/amp/cl", bench_train.Variant(True, None, True, True)),
        (
            "compiled:reduce-overhead/amp/nchw",
            bench_train.Variant(True, "reduce-overhead", True, False),
        ),
        (
            "compiled:max-autotune-no-cudagraphs/fp32/cl",
            bench_train.Variant(True, "max-autotune-no-cudagraphs", False, True),
        ),
    ],
)
def test_parse_variant(name, expected):
    assert bench_train.parse_variant(name) == expected


@pytest.mark.parametrize(
    ("name", "culprit"),
    [
        ("compiled/amp", "must look like"),
        ("jit/amp/cl", "'jit'"),
        ("eager:reduce-overhead/amp/cl", "eager, compiled or compiled:MODE"),
        ("compiled:fast/amp/cl", "'fast'"),
        ("compiled/fp8/cl", "'fp8'"),
        ("compiled/amp/nhwc", "'nhwc'"),
    ],
)
def test_parse_variant_errors_name_the_part(name, culprit):
    with pytest.raises(ValueError, match=culprit):
        bench_train.parse_variant(name)


def test_variant_compile_mode_reaches_the_config():
    args = bench_train.argparse.Namespace(
        image_size=32,
        batch_size=2,
        workers=0,
        teacher="resnet18",
        student="resnet18",
        loss="wsld",
        loss_impl="auto",
        device="cpu",
        compile_mode="default",
    )
    cfg = bench_train.make_config(args, "compiled:reduce-overhead/amp/cl")
    assert cfg.train.compile and cfg.train.compile_mode == "reduce-overhead"
    assert cfg.train.amp == "auto" and cfg.train.channels_last
    cfg = bench_train.make_config(args, "compiled/fp32/nchw")
    assert cfg.train.compile_mode == "default" and cfg.train.amp == "off"


TINY_TRAIN = [
    "--teacher",
    "resnet18",
    "--student",
    "resnet18",
    "--image-size",
    "32",
    "--batch-size",
    "2",
    "--num-classes",
    "10",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--device",
    "cpu",
]


def test_bench_train_failed_variant_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """One variant raising (say a CUDA-graph mode that crashes) leaves its error in the JSON,
    the other variants are still measured, ratios are against the baseline (always measured
    first), and the exit status says something failed."""
    real = bench_train.bench_variant

    def flaky(args, variant, device, num_classes):
        if variant == "eager/amp/nchw":
            raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
        return real(args, variant, device, num_classes)

    monkeypatch.setattr(bench_train, "bench_variant", flaky)
    out = tmp_path / "train.json"
    argv = [*TINY_TRAIN, "--variants", "eager/amp/nchw,eager/fp32/cl,eager/fp32/nchw"]
    assert bench_train.main([*argv, "--json", str(out)]) == 1
    data = load(out)
    rows = {row["variant"]: row for row in data["results"]}
    assert [row["variant"] for row in data["results"]][0] == bench_train.BASELINE
    assert "CUDAGraphs output" not in rows["eager/fp32/cl"].get("error", "")
    assert "overwritten" in rows["eager/amp/nchw"]["error"]
    assert "img_per_s" not in rows["eager/amp/nchw"]
    assert rows[bench_train.BASELINE]["vs_baseline"] == 1.0
    assert rows["eager/fp32/cl"]["img_per_s"] > 0 and rows["eager/fp32/cl"]["vs_baseline"] > 0
    assert data["config"]["flops_per_image"] > 0
    assert "eager/amp/nchw failed: RuntimeError" in capsys.readouterr().out


def test_bench_train_profiles_the_chosen_variant(tmp_path):
    out = tmp_path / "train.json"
    argv = [*TINY_TRAIN, "--variants", "eager/fp32/nchw,eager/fp32/cl", "--json", str(out)]
    argv += ["--profile", str(tmp_path / "prof"), "--profile-variants", "eager/fp32/cl"]
    assert bench_train.main([*argv, "--profile-steps", "2"]) == 0
    rows = {row["variant"]: row for row in load(out)["results"]}
    assert "profile" not in rows["eager/fp32/nchw"]
    profile = rows["eager/fp32/cl"]["profile"]
    assert profile["steps"] == 2 and profile["top_ops"]
    assert [p["phase"] for p in profile["phases"]]  # the step's phases, timed
    assert {p["phase"] for p in profile["phases"]} == {
        "teacher",
        "student_forward",
        "loss",
        "backward",
        "optimizer",
    }
    assert any("conv" in op["name"] for op in profile["top_ops"])
    assert (tmp_path / "prof" / "eager_fp32_cl" / "trace_rank0.json").is_file()


def test_bench_train_baseline_failure_is_fatal(tmp_path, monkeypatch):
    def broken(*_):
        raise RuntimeError("no baseline")

    monkeypatch.setattr(bench_train, "bench_variant", broken)
    with pytest.raises(RuntimeError, match="no baseline"):
        bench_train.main([*TINY_TRAIN, "--variants", "eager/amp/cl"])


def test_bench_train_rejects_unknown_variant(capsys):
    with pytest.raises(SystemExit) as excinfo:
        bench_train.main([*TINY_TRAIN, "--variants", "compiled:turbo/amp/cl"])
    assert excinfo.value.code == 2
    assert "compile mode 'turbo'" in capsys.readouterr().err


def test_bench_train_bad_root_fails_before_benchmarking(tmp_path):
    result = run_script(
        "benchmarks/bench_train.py",
        *TINY_TRAIN,
        "--root",
        str(tmp_path / "nowhere"),
        "--json",
        str(tmp_path / "t.json"),
    )
    assert result.returncode == 2
    assert "bench_train.py: error: data root" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
    assert "img/s" not in result.stdout  # nothing was benchmarked first
    assert not (tmp_path / "t.json").exists()


# --- bench_loss -----------------------------------------------------------------------------------


def test_bench_loss_writes_rows(tmp_path):
    out = tmp_path / "loss.json"
    result = run_script(
        "benchmarks/bench_loss.py",
        "--device",
        "cpu",
        "--sizes",
        "4x8,16x40",
        "--reps",
        "3",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = load(out)["results"]
    assert [(row["N"], row["C"]) for row in rows] == [(4, 8), (16, 40)]
    for row in rows:
        assert row["eager_ms"] > 0 and row["reference_ce_ms"] > 0
        assert row["fused_ms"] > 0 and row["speedup"] > 0 and row["kernels_gb_per_s"] > 0


def test_bench_loss_times_each_cpu_kernel_build(tmp_path):
    """--cpu-kernels: the fused op once per CPU kernel build, with speedups over the first."""
    from fastkd.losses import ops

    if ops.extension is None:
        pytest.skip("fastkd._C is not built")
    kernels = ops.extension.cpu_capabilities.split(",")  # "default" always, "avx2" where built
    out = tmp_path / "loss.json"
    result = run_script(
        "benchmarks/bench_loss.py",
        "--device",
        "cpu",
        "--sizes",
        "16x40",
        "--reps",
        "3",
        "--rounds",
        "3",
        "--cpu-kernels",
        ",".join(kernels),
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    (row,) = load(out)["results"]
    assert all(row[f"fused_ce_{kernel}_ms"] > 0 for kernel in kernels)
    for kernel in kernels[1:]:
        assert (
            row[f"speedup_{kernel}_min"] <= row[f"speedup_{kernel}"] <= row[f"speedup_{kernel}_max"]
        )
    result = run_script("benchmarks/bench_loss.py", "--device", "cpu", "--cpu-kernels", "avx512")
    assert result.returncode == 2 and "no avx512 CPU kernel here" in result.stderr


def test_compare_cpu_kernels_pins_each_call_and_restores(monkeypatch):
    import bench_loss

    monkeypatch.setenv("FASTKD_CPU_CAPABILITY", "mine")
    seen = []
    row = bench_loss.compare_cpu_kernels(
        lambda: seen.append(os.environ["FASTKD_CPU_CAPABILITY"]), ["a", "b"], reps=2, rounds=2
    )
    assert set(seen) == {"a", "b"} and seen.count("a") == seen.count("b")
    assert set(row) == {
        "fused_ce_a_ms",
        "fused_ce_b_ms",
        "speedup_b",
        "speedup_b_min",
        "speedup_b_max",
    }
    assert os.environ["FASTKD_CPU_CAPABILITY"] == "mine"


def test_gpu_loss_check_times_the_cpu_kernels(tmp_path):
    """gpu_loss_check.py --device cpu --quick: the timing rows and goals a GPU run reports, from
    the CPU kernels (this is how the script itself is tested without a GPU). It checks no
    correctness: the tests marked gpu do that on CUDA."""
    out = tmp_path / "loss_check.json"
    result = run_script(
        "benchmarks/gpu_loss_check.py", "--device", "cpu", "--quick", "--json", str(out)
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["status"] == "measured" and "checks" not in data
    assert data["copy_gb_per_s"] > 0
    rows = {(row["dtype"], row["N"], row["C"]): row for row in data["timing"]}
    goal_row = rows[("float16", 256, 1000)]
    assert goal_row["speedup"] > 0 and goal_row["speedup_vs_inductor_ce"] > 0
    assert goal_row["bandwidth_fraction_of_copy"] > 0
    assert "inductor_ce_ms" not in rows[("float32", 256, 1000)]  # only the chosen rows compile
    assert {goal["goal"] for goal in data["goals"]} >= {
        "fused >= 10x eager at 256x1000 float16 (wsld, eager launches)",
        ">= 70% of copy bandwidth at 4096x21843 float16",
    }


# --- bench_data -----------------------------------------------------------------------------------


def test_bench_data_both_backends(tmp_path, tiny_imagefolder):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "data.json"
    result = run_script(
        "benchmarks/bench_data.py",
        "--root",
        str(tiny_imagefolder),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--epochs",
        "1",
        "--rounds",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    torch_row, dali_row, ratio = load(out)["results"]
    assert (torch_row["backend"], torch_row["loader"]) == ("torch", "torch")
    assert dali_row["backend"] == "dali" and dali_row["loader"].startswith("dali")  # no fallback
    # 24 training images in batches of 4; the first batch (warm-up) is not timed or counted.
    assert torch_row["images"] == dali_row["images"] == 20
    assert torch_row["img_per_s"] > 0 and dali_row["img_per_s"] > 0
    ratio_value = dali_row["img_per_s"] / torch_row["img_per_s"]
    assert ratio["ratio_dali_over_torch"] == pytest.approx(ratio_value)


def test_bench_data_missing_root_is_one_clear_error(tmp_path):
    result = run_script("benchmarks/bench_data.py", "--root", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "bench_data.py: error: data root" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


# --- bench_startup --------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_startup_two_processes_scan_once(tmp_path):
    """A tree of ImageNet's shape in miniature, two torchrun processes: one scan, a first step."""
    out = tmp_path / "startup.json"
    result = run_script(
        "benchmarks/bench_startup.py",
        "--root",
        str(tmp_path / "trees"),
        "--classes",
        "12",
        "--train-per-class",
        "6",
        "--val-per-class",
        "1",
        "--small-per-class",
        "0",
        "--procs",
        "2",
        "--timeout",
        "240",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = load(out)["results"]
    assert (row["tree"], row["files"], row["procs"]) == ("large", 84, 2)
    # Rank 0 walks and pre-scans train and val; rank 1 (same node) receives the result.
    assert (row["processes_that_scanned"], row["walks"], row["prescans"]) == (1, 2, 2)
    assert row["scanned"] == "72 train + 12 val" and row["rank0_scan_s"] >= 0
    assert row["launch_to_first_step_s"] > 0
    assert (tmp_path / "trees" / "large" / "train" / "n00000011").is_dir()


def test_bench_startup_never_deletes_a_foreign_folder(tmp_path):
    (tmp_path / "large").mkdir()
    (tmp_path / "large" / "mine.txt").write_text("keep me")
    result = run_script(
        "benchmarks/bench_startup.py",
        "--root",
        str(tmp_path),
        "--classes",
        "2",
        "--train-per-class",
        "1",
        "--small-per-class",
        "0",
    )
    assert result.returncode == 2 and "was not written by bench_startup" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "large" / "mine.txt").read_text() == "keep me"


# --- bench_diagnostics ----------------------------------------------------------------------------


def test_bench_diagnostics_times_both_sides_and_they_differ(tmp_path, capsys):
    """The two sides really differ (one meter sums diagnostics, the other has none) and the JSON
    has both rates, their ratio and the per-round ratios the ratio is read against."""
    import bench_diagnostics

    tiny = ["--teacher", "resnet18", "--image-size", "32", "--batch-size", "4", "--num-classes",
            "10", "--device", "cpu", "--variant", "eager/fp32/nchw", "--warmup", "0"]  # fmt: skip
    args = argparse.Namespace(
        teacher="resnet18", student="resnet18", loss="wsld", loss_impl="auto", image_size=32,
        batch_size=4, num_classes=10, variant="eager/fp32/nchw", compile_mode="default",
        device="cpu", workers=0, log_every=50,
    )  # fmt: skip
    states = bench_diagnostics.build_states(args, torch.device("cpu"))
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    for side, state in states.items():
        bench_diagnostics.run_block(state, images, labels, 1)
        assert (state.meter._counts is not None) == (side == "on"), side
    assert states["on"].student is states["off"].student  # one set of models for both

    out = tmp_path / "diag.json"
    assert bench_diagnostics.main([*tiny, "--rounds", "2", "--block", "1", "--json", str(out)]) == 0
    (row,) = load(out)["results"]
    assert row["on_img_per_s"] > 0 and row["off_img_per_s"] > 0 and len(row["round_ratios"]) == 2
    assert row["ratio_on_off"] == pytest.approx(row["on_img_per_s"] / row["off_img_per_s"])
    assert "ratio_on_off" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_diagnostics.main([*tiny, "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


# --- gpu_check.sh ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_a_gpu_reports_and_skips(tmp_path):
    """On a machine without CUDA the script still runs every section it can, marks the GPU
    ones skipped with a reason, and leaves a summary JSON that says so."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        "FASTKD_GPU_CHECK_SKIP_BUILD": "1",
    }
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    sections = {section["name"]: section for section in summary["sections"]}
    assert summary["all_ok"], sections
    assert sections["build"]["status"] == "skipped"
    assert sections["loss_check"]["result_status"] == "skipped"
    for name in ("trainer", "trainer_cudagraphs", "train", "diagnostics"):
        assert sections[name]["status"] == "skipped"
        assert "no CUDA device" in " ".join(sections[name]["log_tail"])
    assert sections["tests"]["result_status"] == "passed"  # the gpu tests, all skipped here
    env_facts = json.loads((out / "env.json").read_text())
    assert env_facts["cuda_available"] is False
    # $OUT holds the environment, the summary and one JSON per section that ran; logs stay in
    # $WORK (their tails are in the summary).
    assert sorted(p.name for p in out.iterdir()) == [
        "env.json",
        "gpu_check.json",
        "loss_check.json",
        "tests.json",
    ]
