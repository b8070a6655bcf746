"""Run records: JSON-lines metrics, console progress lines, TensorBoard when asked (train.tensorboard).

Only rank 0 writes; other ranks get a logger that drops everything, so callers never branch on rank.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from fastkd.errors import ConfigError

log = logging.getLogger("fastkd")


def setup_console(is_main: bool) -> None:
    """Plain ``fastkd: message`` lines on stderr for rank 0; warnings only on other ranks."""
    root = logging.getLogger("fastkd")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.propagate = False


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``12s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a `ConfigError` saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError as exc:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from exc
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; with ``tensorboard=True`` also
    mirrors numeric fields as scalars ``EVENT/KEY`` to ``run_dir/tensorboard`` (x = global_step,
    else epoch). A missing tensorboard package is then a `ConfigError`, not a silent no-op."""

    def __init__(
        self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        summary_writer = require_tensorboard() if tensorboard else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)  # line-buffered: a crash keeps every record
        if summary_writer is not None:
            self._tb = summary_writer(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, event: str, **fields: Any) -> None:
        """One record ``{"event": event, "time": ..., **fields}``."""
        if not self.enabled or self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            step = fields.get("global_step", fields.get("epoch", 0))
            for key, value in fields.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and key not in ("epoch", "global_step", "step")
                ):
                    self._tb.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
