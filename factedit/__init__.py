"""factedit: locate, edit and verify facts through their recall circuits.

The public names are imported on first use (PEP 562), so that ``import factedit.cli`` starts
quickly: the command line imports torch and transformers only inside a command, where an
interrupt (Ctrl-C) is reported as one line with exit code 130.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from factedit._version import __version__

_WHERE = {
    "LocateConfig": "factedit.analysis.circuit", "RecallCircuit": "factedit.analysis.circuit",
    "locate": "factedit.analysis.locate", "edit": "factedit.editing.api", "EditConfig": "factedit.editing.config",
    "EditRequest": "factedit.editing.requests", "load_requests": "factedit.editing.requests",
    "load_model": "factedit.models.loading", "VerifyOptions": "factedit.verify.checks",
    "VerifyReport": "factedit.verify.run", "verify": "factedit.verify.run", "PromptSet": "factedit.verify.checks",
    "pool_prompts": "factedit.studies.verify_prompts",
}

__all__ = ["EditConfig", "EditRequest", "LocateConfig", "PromptSet", "RecallCircuit", "VerifyOptions", "VerifyReport",
           "edit", "load_model", "load_requests", "locate", "pool_prompts", "verify", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'factedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``factedit.verify`` is the function, as ``from factedit.verify.run import verify`` made it
    when this file imported everything: importing the subpackage ``factedit.verify`` (it stays
    in ``sys.modules``) does not replace it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "verify" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
