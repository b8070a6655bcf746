"""The errors a user can fix, under one base class the entry points catch.

Every entry point prints a `UserError` as one ``fastkd: error: ...`` line (``python -m
fastkd.train``, ``fastkd.eval``, ``fastkd.quickstart``, ``fastkd.data.synthetic``; a benchmark
names itself instead of ``fastkd``) and exits with status 2;
anything else is a bug and keeps its traceback. Each message names the culprit (key, file,
rank) and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: printed as one line by the entry points, exit status 2."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


class DataError(UserError, ValueError):
    """A problem with the data (paths, layout, files); the message says what to do."""


class ModelError(UserError, ValueError):
    """An unknown architecture or an unusable weights file; the message names it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class PeerSetupError(UserError, RuntimeError):
    """Another rank failed a setup step that this rank passed; this rank stops too."""
