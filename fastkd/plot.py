"""``python -m fastkd.plot RUN_DIR [RUN_DIR ...] --out DIR``: PNG figures of runs' metrics.jsonl.

One figure per topic: loss terms (train, per step), top-1/top-5 (per epoch), lr, images/sec,
data-wait fraction, the distillation diagnostics (``wsld.png``: w's mean and p10/p50/p90, the
regularization-sample fraction, mean w on them vs the rest, the teacher's train top-1,
``wsld_weight``; see fastkd/diagnostics.py) and any other numeric step field.
Several runs overlay, labelled ``FOLDER (loss.kind)``. Every record is plotted in file order, so
a resumed run (several ``start`` records) shows as one curve. Needs matplotlib (the ``plot``
extra); drawn with the non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastkd.errors import DataError, UserError
from fastkd.logging import read_metrics

INSTALL_HINT = 'fastkd.plot needs matplotlib: pip install -e ".[plot]"'
LOSS_TERMS = ("loss", "ce", "kd", "wsld")
WSLD_FIELDS = ("wsld_weight", "teacher_train_top1")
WSLD_PREFIXES = ("w_", "reg_")
# The diagnostics' panels: (title, y label, curves as (key, legend suffix, line style)).
WSLD_PANELS = (
    ("w per log interval: mean, p10 / p50 / p90", "w",
     (("w_mean", " mean", "-"), ("w_p10", " p10", ":"), ("w_p50", " p50", "--"),
      ("w_p90", " p90", "-."))),
    ("regularization samples (CE_s < CE_t)", "fraction of rows", (("reg_frac", "", "-"),)),
    ("mean w: regularization samples vs the rest", "w",
     (("w_reg", " reg. samples", "-"), ("w_rest", " rest", "--"))),
    ("teacher top-1 on the training batches", "fraction", (("teacher_train_top1", "", "-"),)),
    ("wsld_weight (mean w, epoch so far)", "w", (("wsld_weight", "", "-"),)),
)  # fmt: skip
# Step fields with a figure of their own (or none: counters and bookkeeping).
KNOWN_STEP_FIELDS = {
    "event",
    "time",
    "epoch",
    "step",
    "global_step",
    "lr",
    "img_per_s",
    "data_wait_frac",
    *LOSS_TERMS,
}


@dataclass
class Series:
    """One run's records, split by kind, and its legend label."""

    label: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)


def load_run(run_dir: Path) -> Series:
    """The step and epoch records of ``run_dir``, labelled ``FOLDER (loss.kind)``."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is it a fastkd run folder?)")
    try:
        records = read_metrics(run_dir)
    except ValueError as exc:
        raise DataError(f"{run_dir}/metrics.jsonl: not JSON lines ({exc})") from exc
    series = Series(label=_label(run_dir))
    series.steps = [r for r in records if r.get("event") == "step" and "global_step" in r]
    series.epochs = [r for r in records if r.get("event") == "epoch" and "epoch" in r]
    if not series.steps and not series.epochs:
        raise DataError(f"{run_dir}/metrics.jsonl has no step or epoch records: nothing to plot")
    return series


def _label(run_dir: Path) -> str:
    name = run_dir.resolve().name
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        kind = config["loss"]["kind"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return name
    return f"{name} ({kind})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if _is_number(r.get(y)) and _is_number(r.get(x))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _present(runs: list[Series], key: str, kind: str = "steps") -> bool:
    return any(
        _points(getattr(s, kind), "global_step" if kind == "steps" else "epoch", key)[0]
        for s in runs
    )


def _extra_fields(runs: list[Series]) -> tuple[list[str], list[str]]:
    """(WSLD-specific, other) numeric step fields beyond the known ones, in first-seen order."""
    seen: dict[str, None] = {}
    for series in runs:
        for record in series.steps:
            for key, value in record.items():
                if key not in KNOWN_STEP_FIELDS and _is_number(value):
                    seen.setdefault(key, None)
    wsld = [k for k in seen if k in WSLD_FIELDS or k.startswith(WSLD_PREFIXES)]
    return wsld, [k for k in seen if k not in wsld]


@dataclass
class Panel:
    """One axes: ``(kind, key, legend suffix, line style)`` curves over steps or epochs."""

    title: str
    ylabel: str
    curves: list[tuple[str, str, str, str]]
    log_y: bool = False


def figure_specs(runs: list[Series]) -> dict[str, list[Panel]]:
    """Figure name -> its panels, for the fields present in ``runs``."""
    specs: dict[str, list[Panel]] = {}
    losses = [t for t in LOSS_TERMS if _present(runs, t)]
    if losses:
        specs["loss"] = [Panel(f"train {t}", t, [("steps", t, "", "-")]) for t in losses]
    top1 = [("epochs", "top1", " val", "-"), ("epochs", "train_top1", " train", "--")]
    top5 = [("epochs", "top5", "", "-")]
    accuracy = [
        Panel(title, f"{title} (fraction)", [c for c in curves if _present(runs, c[1], "epochs")])
        for title, curves in (("top-1", top1), ("val top-5", top5))
    ]
    if any(panel.curves for panel in accuracy):
        specs["accuracy"] = [panel for panel in accuracy if panel.curves]
    singles = (
        ("lr", "lr", "learning rate", True),
        ("throughput", "img_per_s", "images / s", False),
        ("data_wait", "data_wait_frac", "data-wait fraction of step time", False),
    )
    for name, key, ylabel, log_y in singles:
        if _present(runs, key):
            specs[name] = [Panel(ylabel, ylabel, [("steps", key, "", "-")], log_y=log_y)]
    wsld, other = _extra_fields(runs)
    if (
        "wsld_weight" in wsld
        and all(  # w_mean per interval says it: wsld_weight is its running epoch mean
            _present([s], "w_mean") for s in runs if _present([s], "wsld_weight")
        )
    ):
        wsld.remove("wsld_weight")
    panels = []
    for title, ylabel, curves in WSLD_PANELS:
        present = [("steps", key, suffix, style) for key, suffix, style in curves if key in wsld]
        if present:
            panels.append(Panel(title, ylabel, present))
    grouped = {key for _, _, curves in WSLD_PANELS for key, _, _ in curves}
    panels += [Panel(k, k, [("steps", k, "", "-")]) for k in wsld if k not in grouped]
    if panels:
        specs["wsld"] = panels
    if other:
        specs["other"] = [Panel(k, k, [("steps", k, "", "-")]) for k in other]
    return specs


def draw(runs: list[Series], specs: dict[str, list[Panel]], out: Path) -> list[Path]:
    """Write one PNG per figure into ``out``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, panels in specs.items():
        cols = min(len(panels), 2)
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.0 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            _draw_panel(ax, runs, panel)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        fig.suptitle(f"fastkd: {name.replace('_', ' ')}")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _draw_panel(ax: Any, runs: list[Series], panel: Panel) -> None:
    """``panel``'s curves for every run: one colour per run (the same in every figure)."""
    from matplotlib.ticker import MaxNLocator

    by_epoch = panel.curves[0][0] == "epochs"
    for index, series in enumerate(runs):
        for kind, key, suffix, style in panel.curves:
            x, y = _points(getattr(series, kind), "epoch" if by_epoch else "global_step", key)
            if x:
                marker = "o" if by_epoch else None
                ax.plot(x, y, style, color=f"C{index % 10}", marker=marker, markersize=3,
                        label=series.label + suffix)  # fmt: skip
    ax.set_title(panel.title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch" if by_epoch else "global step")
    ax.set_ylabel(panel.ylabel)
    if panel.log_y and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Read every run, then write the figures into ``out``; returns the written PNGs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UserError(INSTALL_HINT) from exc
    runs = [load_run(Path(d)) for d in run_dirs]
    return draw(runs, figure_specs(runs), Path(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (run.dir)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out)
    except UserError as exc:
        print(f"fastkd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
