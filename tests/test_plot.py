"""Seeing runs: ``python -m fastkd.plot`` figures, TensorBoard scalars (train.tensorboard), the
quickstart's pointer at the plot command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from fastkd.config import Config, ConfigError, load_config
from fastkd.logging import MetricsWriter, read_metrics
from fastkd.plot import WSLD_PANELS, figure_specs, load_run
from fastkd.plot import main as plot_main
from fastkd.quickstart import format_report
from fastkd.trainer import run

pytest.importorskip("matplotlib")  # a guard only: the dev extra installs it

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["loss", "accuracy", "lr", "throughput", "data_wait", "wsld", "other"]


def fake_run(run_dir: Path, kind: str, *, epochs: int = 3, steps: int = 4) -> Path:
    """A run folder with config.yaml and a metrics.jsonl resumed once (two ``start`` records)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"loss": {"kind": kind}}))
    writer = MetricsWriter(run_dir)
    for epoch in range(1, epochs + 1):
        if epoch in (1, 2):  # the second start: a resume before epoch 2
            writer.write("start", world_size=1, resumed_from="" if epoch == 1 else "last.pt")
        for step in range(1, steps + 1):
            g = (epoch - 1) * steps + step
            terms = {"loss": 2.0 / g, "ce": 1.5 / g}
            if kind == "wsld":
                terms.update(wsld=0.5 / g, wsld_weight=0.3 + 0.01 * g, reg_extra=0.1 * g)
                terms.update(  # fastkd.diagnostics' fields
                    w_mean=0.6, w_p10=0.2 + 0.01 * g, w_p50=0.6, w_p90=0.9, reg_frac=0.4,
                    w_reg=0.3, w_rest=0.8, teacher_train_top1=0.5 + 0.01 * g,
                )  # fmt: skip
            writer.write(
                "step",
                epoch=epoch,
                step=step,
                global_step=g,
                lr=0.1 * 0.9**g,
                img_per_s=100.0 + g,
                data_wait_frac=0.05,
                mfu=0.2,
                skipped_steps=0,
                **terms,
            )
        writer.write(
            "epoch", epoch=epoch, loss=1.0 / epoch, train_top1=0.2 * epoch, top1=0.25 * epoch,
            top5=0.3 * epoch, val_loss=1.0, img_per_s=100.0, epoch_time_s=1.0,
        )  # fmt: skip
    writer.close()
    return run_dir


def tiny_config(tmp_path: Path, root: Path, *overrides: str) -> Config:
    """Two CPU epochs of 3 steps on the tiny set (as in test_train.py), run folder tmp_path/run."""
    config = {
        "run": {"dir": str(tmp_path / "run"), "seed": 0},
        "data": {"root": str(root), "image_size": 32, "val_resize": 36, "batch_size": 8,
                 "workers": 0},
        "student": {"arch": "resnet18"},
        "loss": {"kind": "ce"},
        "optim": {"lr": 0.05},
        "sched": {"kind": "constant"},
        "train": {"epochs": 2, "compile": False, "log_every": 1, "amp": "off"},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, list(overrides))


def assert_pngs(paths: list[Path], min_bytes: int = 8_000) -> None:
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, path
        assert len(data) > min_bytes, (path, len(data))


def test_every_figure_of_a_resumed_wsld_run(tmp_path, capsys):
    run = fake_run(tmp_path / "wsld", "wsld")
    out = tmp_path / "plots"
    assert plot_main([str(run), "--out", str(out)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert [p.stem for p in written] == ALL_FIGURES
    assert sorted(out.iterdir()) == sorted(written)
    assert_pngs(written)
    series = load_run(run)
    assert series.label == "wsld (wsld)"
    # Both segments of the resumed run, in order: one curve over global steps 1..12.
    assert [r["global_step"] for r in series.steps] == list(range(1, 13))
    assert [r["epoch"] for r in series.epochs] == [1, 2, 3]
    specs = figure_specs([series])
    assert [p.title for p in specs["loss"]] == ["train loss", "train ce", "train wsld"]
    titles = [p.title for p in specs["wsld"]]  # wsld_weight (w_mean's running epoch mean): left out
    assert titles == [panel[0] for panel in WSLD_PANELS[:-1]] + ["reg_extra"]
    older = fake_run(tmp_path / "older", "wsld")  # a run from before the diagnostics
    lines = (older / "metrics.jsonl").read_text().splitlines()
    trimmed = [{k: v for k, v in json.loads(line).items() if k != "w_mean"} for line in lines]
    (older / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trimmed))
    both = figure_specs([series, load_run(older)])["wsld"]
    assert "wsld_weight (mean w, epoch so far)" in [p.title for p in both]
    w_panel = specs["wsld"][0]
    assert [curve[1] for curve in w_panel.curves] == ["w_mean", "w_p10", "w_p50", "w_p90"]
    assert [p.title for p in specs["other"]] == ["mfu", "skipped_steps"]
    assert [[c[1] for c in p.curves] for p in specs["accuracy"]] == [
        ["top1", "train_top1"],
        ["top5"],
    ]


def test_two_runs_overlay_with_labels(tmp_path, capsys):
    baseline = fake_run(tmp_path / "baseline", "ce")
    wsld = fake_run(tmp_path / "wsld", "wsld", epochs=2)
    (tmp_path / "bare").mkdir()  # no config.yaml: labelled by folder name alone
    bare = fake_run(tmp_path / "bare" / "run3", "ce")
    (bare / "config.yaml").unlink()
    out = tmp_path / "plots"
    assert plot_main([str(baseline), str(wsld), str(bare), "--out", str(out)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert [p.stem for p in written] == ALL_FIGURES  # wsld's fields come from the wsld run
    assert_pngs(written)
    runs = [load_run(p) for p in (baseline, wsld, bare)]
    assert [s.label for s in runs] == ["baseline (ce)", "wsld (wsld)", "run3"]
    import matplotlib.pyplot as plt

    from fastkd.plot import _draw_panel

    fig, ax = plt.subplots()
    _draw_panel(ax, runs, figure_specs(runs)["accuracy"][0])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    colors = [line.get_color() for line in ax.get_lines()]
    plt.close(fig)
    assert labels == [
        f"{run} {split}"
        for run in ("baseline (ce)", "wsld (wsld)", "run3")
        for split in ("val", "train")
    ]
    assert colors == ["C0", "C0", "C1", "C1", "C2", "C2"]  # one colour per run


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run", "ce")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_main([str(run), "--out", str(tmp_path / "plots")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        'fastkd: error: fastkd.plot needs matplotlib: pip install -e ".[plot]"\n'
    )
    assert not (tmp_path / "plots").exists()


def test_bad_run_folders_are_one_line_each(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_main([str(empty), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fastkd: error: ") and f"{empty}: no metrics.jsonl" in err

    started = tmp_path / "started"
    MetricsWriter(started).write("start", world_size=1)  # crashed before its first step record
    assert plot_main([str(started), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no step or epoch records" in err and str(started) in err
    assert not (tmp_path / "plots").exists()


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_numeric_fields(tmp_path):
    pytest.importorskip("tensorboard")
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write("step", epoch=1, step=1, global_step=7, lr=0.5, loss=2.25, ok=True, name="x")
    writer.write("epoch", epoch=1, top1=0.75, top5=None)
    writer.close()
    assert _scalars(tmp_path / "tensorboard") == {
        "step/lr": [(7, 0.5)],
        "step/loss": [(7, 2.25)],
        "epoch/top1": [(1, 0.75)],
    }
    off = tmp_path / "off"
    MetricsWriter(off).close()  # the default: metrics.jsonl only
    assert not (off / "tensorboard").exists()


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, monkeypatch, tiny_imagefolder):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    message = "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
    with pytest.raises(ConfigError, match=message):
        MetricsWriter(tmp_path / "w", tensorboard=True)
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
    MetricsWriter(tmp_path / "w", enabled=False, tensorboard=True)  # other ranks: no check

    cfg = tiny_config(tmp_path, tiny_imagefolder, "train.tensorboard=true")
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (Path(cfg.run.dir) / "config.yaml").exists()  # refused before the run began


@pytest.mark.slow
def test_a_tiny_real_run_plots_and_mirrors_to_tensorboard(tmp_path, tiny_imagefolder, capsys):
    pytest.importorskip("tensorboard")
    overrides = ["train.tensorboard=true", "train.max_steps_per_epoch=2"]
    cfg = tiny_config(tmp_path, tiny_imagefolder, *overrides, "train.channels_last=false")
    run(cfg)
    run_dir = Path(cfg.run.dir)
    records = read_metrics(run_dir)
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    scalars = _scalars(run_dir / "tensorboard")
    assert scalars["step/loss"] == [
        (r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps
    ]
    assert scalars["epoch/top1"] == [(r["epoch"], pytest.approx(r["top1"])) for r in epochs]
    assert {"step/lr", "step/img_per_s", "step/data_wait_frac", "epoch/top5"} <= scalars.keys()

    out = tmp_path / "plots"
    capsys.readouterr()
    assert plot_main([str(run_dir), "--out", str(out)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert {"loss", "accuracy", "lr", "throughput", "data_wait"} <= {p.stem for p in written}
    assert_pngs(written, min_bytes=5_000)
    assert load_run(run_dir).label == "run (ce)"


def test_quickstart_report_points_at_the_plot_command():
    summaries = [
        {"stage": stage, "student_arch": "resnet18", "loss": loss, "top1": 0.5, "top5": 0.9,
         "img_per_s": 10.0, "wall_s": 1.0, "run_dir": f"runs/quickstart/{stage}",
         "num_val_images": 15}
        for stage, loss in (("teacher", "ce"), ("baseline", "ce"), ("wsld", "wsld"))
    ]  # fmt: skip
    last = format_report(summaries).splitlines()[-1]
    assert last == (
        "plots: python -m fastkd.plot runs/quickstart/baseline runs/quickstart/wsld "
        "--out runs/quickstart/plots"
    )
