"""Where things live: the embedded checkpoint and output-folder checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from factedit.errors import OutputDirError

_PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_NAME = "demo-world"


def demo_checkpoint() -> Path:
    """The embedded demo model folder.

    Looked up in ``$FACTEDIT_DEMO_CHECKPOINT`` if set, then beside the package (a source
    checkout or an editable install), then where a wheel installs it
    (``<prefix>/share/factedit/checkpoints/demo-world``).
    """
    env = os.environ.get("FACTEDIT_DEMO_CHECKPOINT")
    candidates = [Path(env)] if env else []
    candidates += [_PACKAGE_DIR.parent / "checkpoints" / DEMO_NAME,
                   Path(sys.prefix) / "share" / "factedit" / "checkpoints" / DEMO_NAME]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise FileNotFoundError(
        "the embedded demo model was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); train it with `factedit world train --out checkpoints/demo-world`"
    )


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite``; never delete anything here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file, not a folder: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(
            f"--out {out} exists and is not empty: choose a new folder or pass --overwrite"
        )
    return out
