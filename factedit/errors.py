"""factedit's error types. Each message names what was wrong and how to fix it."""

from __future__ import annotations

import reprlib

# exit codes of the ``factedit`` command (docs/reliability.md)
EXIT_OK = 0  # done; every edit passed
EXIT_EDIT_FAILED = 1  # an edit failed: `verify` judged it failed, or `edit` could not move its target
EXIT_BAD_INPUT = 2  # bad input or environment: nothing was computed or written (one line `error: ...`)
EXIT_INTERNAL = 3  # an internal error (a bug in factedit): one line `error: internal error ...`
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C, SIGINT): one line; nothing half-written is left


class FactEditError(Exception):
    """Base of the errors the CLI reports as one line with exit code 2 (``exit_code``)."""

    exit_code = EXIT_BAD_INPUT


class EditFailedError(FactEditError):
    """An edit did its work but did not achieve it (e.g. the fit left the target where it was)."""

    exit_code = EXIT_EDIT_FAILED


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
MAX_SHOWN = 160


def shown(value) -> str:
    """``repr(value)`` bounded in length and depth, for echoing user values in messages (a
    value may be huge, or a YAML alias bomb that expands exponentially)."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


class ModelLoadError(FactEditError):
    pass


class OutputDirError(FactEditError):
    pass
