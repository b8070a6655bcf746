"""Shared helpers of the benchmark scripts: one table style, one JSON layout, machine facts.

Every benchmark prints a plain-text table and, with ``--json PATH``, writes
``{"benchmark": NAME, "machine": {...}, "config": {...}, "results": [...]}`` so that
RESULTS.md rows can be traced back to the command, machine, date and commit that produced them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fastkd.errors import UserError


def git_commit() -> str:
    """The current commit of the checkout (with ``-dirty`` when it has changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _cpuinfo_field(name: str) -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (bf16 results and oneDNN's kernels differ between CPU models)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_bf16_units() -> str:
    """Which bf16 hardware the CPU has: "amx" (Intel AMX), "avx512_bf16", or "none"."""
    flags = set((_cpuinfo_field("flags") or "").split())
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "none"


def machine_info() -> dict[str, Any]:
    """Facts about this machine that a reader needs to compare two benchmark runs."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_bf16": cpu_bf16_units(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["gpu"] = None
    return info


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render ``rows`` as a fixed-width text table with the given column order."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
        return "-" if value is None else str(value)

    body = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [
        max(len(col), *(len(r[i]) for r in body)) if body else len(col)
        for i, col in enumerate(columns)
    ]
    lines = ["  ".join(col.rjust(w) for col, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def write_json(
    path: str | os.PathLike | None, name: str, config: dict[str, Any], results: list[dict[str, Any]]
) -> None:
    """Write one benchmark's results with the machine facts; no-op when ``path`` is None."""
    if path is None:
        return
    payload = {"benchmark": name, "machine": machine_info(), "config": config, "results": results}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a benchmark's ``main`` and exit with its status; a problem the user can fix (a missing
    data root, a bad config value, unreadable weights) is one ``NAME: error: ...`` line and exit
    status 2, as in ``python -m fastkd.train``, instead of a traceback."""
    name = Path(sys.argv[0]).name
    try:
        status = main()
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
