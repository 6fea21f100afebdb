"""factedit's error types. Each message names what was wrong and how to fix it."""

from __future__ import annotations


class FactEditError(Exception):
    """Base of the errors the CLI reports as one line with exit code 2."""


class ModelLoadError(FactEditError):
    pass


class OutputDirError(FactEditError):
    pass
