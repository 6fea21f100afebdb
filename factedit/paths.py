"""Where things live: the embedded checkpoint and output-folder checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from factedit.errors import ModelLoadError, OutputDirError

_PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_NAME = "demo-world"


class DemoNotFoundError(ModelLoadError, FileNotFoundError):
    pass


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
    raise DemoNotFoundError(
        "the embedded demo model was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); train it with `factedit world train --out checkpoints/demo-world`"
    )


def check_output_dir(out: str | Path, overwrite: bool, model_dir: str | Path | None = None) -> Path:
    """Check an output folder before anything is computed, so that a run never fails only when
    it writes: refuse a path that is a file (or a device), a symbolic link, the current folder
    or one of its parents, a folder that cannot be written, a non-empty folder unless
    ``overwrite``, and a folder inside (or holding) ``model_dir``, the base model's folder.
    Never creates or deletes anything."""
    out = Path(out)
    if not str(out).strip():
        raise OutputDirError("--out is empty: give a folder path")
    if out.is_symlink():
        raise OutputDirError(f"--out {out} is a symbolic link: pass the folder it points to, or a new folder")
    try:
        resolved = out.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a symbolic link loop above it
        raise OutputDirError(f"--out {out} cannot be resolved ({exc}): choose another folder") from None
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file, not a folder: choose a folder path")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or out.name in (".", ".."):
        raise OutputDirError(f"--out {out} is the current folder or holds it: choose a subfolder, e.g. "
                             f"--out {Path(out) / 'factedit-out'}")
    if model_dir is not None and Path(model_dir).is_dir():
        b, o = Path(model_dir).resolve(), resolved
        if o == b or b in o.parents or o in b.parents:
            raise OutputDirError(
                f"--out {out} is inside (or holds) the model folder {model_dir}: factedit never writes to the "
                "base model's folder; choose an output folder outside it"
            )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(
            f"--out {out} exists and is not empty: choose a new folder or pass --overwrite"
        )
    # the nearest folder that exists must be writable: the output (and its hidden staging
    # sibling) is created there
    probe = resolved
    while not probe.exists():
        probe = probe.parent
    targets = [probe] if probe != resolved else [resolved, resolved.parent]
    for t in targets:
        if not t.is_dir():
            raise OutputDirError(f"--out {out}: {t} is not a folder: choose a folder path")
        if not _writable(t):
            raise OutputDirError(f"--out {out}: the folder {t} is not writable: choose a folder you can write to")
    return out


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (tried, as permission bits alone do not say it
    for root or on a read-only file system)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def world_file(model) -> Path | None:
    """A world model's ``world.json`` (the synthetic world it was trained on), or None: the
    one place that knows where a loaded model (or its folder) keeps its world."""
    folder = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", "")
    path = Path(str(folder or "")) / "world.json"
    return path if folder and path.is_file() else None
