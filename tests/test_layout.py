"""The package's shape: no import cycle, the command lines are leaves, every user error shares
one base class. Read from the sources (ast), so a check costs no import."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import fastkd.checkpoint
import fastkd.config
import fastkd.data
import fastkd.distributed
import fastkd.errors
import fastkd.models

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastkd"
# Modules run as ``python -m``; nothing may import them (their code is argument parsing).
COMMAND_LINES = {"fastkd.train"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fastkd_imports(path: Path, known: set[str]) -> set[str]:
    """The fastkd modules ``path`` imports (``from pkg import submodule`` counts as the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastkd"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastkd"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(submodules or {node.module})
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: fastkd_imports(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, chain: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            # A package importing its own submodule (its __init__ re-exporting) is no cycle.
            if module.startswith(imported + "."):
                continue
            if state.get(imported) == "open":
                pytest.fail(f"import cycle: {' -> '.join([*chain, module, imported])}")
            if imported not in state:
                visit(imported, [*chain, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("folder", ["fastkd", "benchmarks"], ids=["package", "benchmarks"])
def test_nothing_imports_a_command_line_module(folder):
    known = {module_name(path) for path in PACKAGE.rglob("*.py")}
    for path in (ROOT / folder).rglob("*.py"):
        imported = fastkd_imports(path, known) & COMMAND_LINES
        assert not imported, (
            f"{path.relative_to(ROOT)} imports {imported}: use fastkd.builders / fastkd.trainer"
        )


def test_every_user_error_is_a_user_error():
    """The entry points catch `UserError` alone: every error type a user can cause derives from it."""
    kinds = {
        fastkd.config.ConfigError,
        fastkd.data.DataError,
        fastkd.models.ModelError,
        fastkd.checkpoint.CheckpointError,
        fastkd.distributed.PeerSetupError,
        fastkd.errors.Diverged,
    }
    # Not an error: a run stopped by a signal after saving its position (exit status 75).
    stopped = fastkd.errors.Preempted
    defined = {
        obj
        for _, obj in inspect.getmembers(fastkd.errors, inspect.isclass)
        if obj.__module__ == "fastkd.errors" and obj is not fastkd.errors.UserError
    }
    assert kinds | {stopped} == defined
    assert all(issubclass(kind, fastkd.errors.UserError) for kind in kinds)
    assert not issubclass(stopped, fastkd.errors.UserError)
    assert len({kind.exit_code for kind in kinds} | {stopped.exit_code}) == 3  # 2, 3 and 75
    # Each entry point names UserError in its handler; those that train also Preempted.
    for entry in ("train.py", "eval.py", "quickstart.py", "plot.py"):
        source = (PACKAGE / entry).read_text()
        assert "except UserError" in source, entry
        trains = entry not in ("eval.py", "plot.py")
        assert ("except Preempted" in source) == trains, entry
