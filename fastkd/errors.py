"""The errors a user can fix, under one base class the entry points catch, and the exit codes.

Every entry point prints a `UserError` as one ``fastkd: error: ...`` line (``python -m
fastkd.train``, ``fastkd.eval``, ``fastkd.quickstart``, ``fastkd.data.synthetic``; a benchmark
names itself instead of ``fastkd``) and exits with its ``exit_code`` (2; `Diverged`: 3);
anything else is a bug and keeps its traceback. Each message names the culprit (key, file,
rank) and what to do. A run stopped by SIGTERM/SIGINT after saving its position raises
`Preempted`, not an error: the trainer's entry points exit with `EXIT_PREEMPTED` (75), which a
requeue script reads as "resume me".
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
# sysexits.h EX_TEMPFAIL, "a temporary failure: the user is invited to retry": the run saved its
# exact position in last.pt and continues with run.resume=auto.
EXIT_PREEMPTED = 75


class UserError(Exception):
    """A problem the user can fix: printed as one line by the entry points, exit status 2."""

    exit_code = EXIT_USER_ERROR


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


class Diverged(UserError, RuntimeError):
    """The loss or the weights became non-finite; no checkpoint was overwritten. Exit status 3."""

    exit_code = EXIT_DIVERGED


class Preempted(Exception):
    """SIGTERM/SIGINT stopped the run at a step boundary after last.pt was saved (exit 75)."""

    exit_code = EXIT_PREEMPTED
