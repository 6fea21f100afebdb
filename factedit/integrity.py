"""What factedit writes and reads back, kept honest: SHA-256 of content written with it (a
mismatch is refused for an edit's folder, rebuilt for a cache), and where caches may live.

- Integrity (:func:`sha256_bytes`, :func:`sha256_json`, :func:`sha256_tensors`,
  :func:`seal_manifest`, :func:`check_folder_integrity`): files that factedit writes and reads
  back carry a SHA-256 of their content, written with them.
- Cache locations (:func:`cache_root`, :func:`check_cache_dir`): ``$FACTEDIT_CACHE`` set but
  empty is refused; a cache never goes into a model folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError, shown
from factedit.validate import check_path_arg

# ---- integrity -------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """The SHA-256 of ``obj``'s canonical strict JSON (sorted keys): the same for the value
    written and the value read back."""
    from factedit.io import dumps_json

    return sha256_bytes(dumps_json(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def sha256_tensors(tensors: dict, extra: Any = None) -> str:
    """The SHA-256 of named tensors (name, dtype, shape, bytes, in name order) and ``extra``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    if extra is not None:
        h.update(sha256_json(extra).encode())
    return h.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


# ---- caches ----------------------------------------------------------------------------------

def cache_root() -> Path:
    """``$FACTEDIT_CACHE``, or ``~/.cache/factedit`` when it is unset. Set but empty is refused
    (it would silently mean the current folder)."""
    env = os.environ.get("FACTEDIT_CACHE")
    if env is None:
        return Path.home() / ".cache" / "factedit"
    if not env.strip():
        raise FactEditError("FACTEDIT_CACHE is set but empty: set it to a folder for factedit's caches, or unset it "
                            "(default ~/.cache/factedit)")
    root = Path(env).expanduser()
    if root.exists() and not root.is_dir():
        raise FactEditError(f"FACTEDIT_CACHE {root} is a file, not a folder: set it to a folder for factedit's "
                            "caches, or unset it")
    if _in_model_folder(root) is not None:
        raise FactEditError(f"FACTEDIT_CACHE {root} is inside the model folder "
                            f"{_in_model_folder(root)}: caches never go into a model folder; set it elsewhere")
    return root


def _in_model_folder(path: Path, model_dirs: Iterable[Path | None] = ()) -> Path | None:
    """The model folder that ``path`` is or is inside of: one of ``model_dirs``, or any folder
    at or above ``path`` holding config.json with weights or an adapter; None if none."""
    try:
        p = Path(path).expanduser().resolve(strict=False)
    except (OSError, RuntimeError):
        return None
    for m in model_dirs:
        if m is None:
            continue
        try:
            b = Path(m).resolve()
        except (OSError, RuntimeError):
            continue
        if b.is_dir() and (p == b or b in p.parents):
            return Path(m)
    for folder in (p, *p.parents):
        if _is_model_folder(folder):
            return folder
    return None


def _is_model_folder(folder: Path) -> bool:
    try:
        return (folder / "config.json").is_file() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
                                                       or (folder / "adapter_config.json").is_file())
    except OSError:
        return False


def check_cache_dir(path: str | Path, label: str, model_dirs: Iterable[Path | None] = ()) -> Path:
    """A cache folder given by the user (``--fit-cache``): a folder (or a path to create one),
    never inside (or holding) a model or checkpoint folder."""
    path = check_path_arg(path, label)
    if path.exists() and not path.is_dir():
        raise FactEditError(f"{label} {path} is not a directory: give a directory for the cached values")
    model = _in_model_folder(path, model_dirs)
    if model is not None:
        raise FactEditError(f"{label} {path} is inside the model folder {model}: caches never go into a "
                            "model or checkpoint folder; choose a folder outside it")
    return path


# ---- an edit's folder: the SHA-256 of its files, recorded in edits.json -------------------------

SEALED_FILES = ("adapter_model.safetensors", "adapter_config.json", "sequence.safetensors")


def seal_manifest(man: dict, files: dict[str, bytes]) -> dict:
    """``man`` with an ``integrity`` record: the SHA-256 of each of ``files`` (name -> the bytes
    written) and of the manifest itself (its canonical JSON without this record)."""
    import json

    from factedit.io import dumps_json

    out = {k: v for k, v in man.items() if k != "integrity"}
    as_read = json.loads(dumps_json(out))  # what a reader gets back (tuples as lists, NaN as null)
    out["integrity"] = {"algorithm": "sha256", "files": {n: sha256_bytes(b) for n, b in sorted(files.items())},
                        "manifest": sha256_json(as_read)}
    return out


def check_folder_integrity(folder: str | Path, man: dict, log=lambda m: None, files: bool = True) -> bool:
    """Check an edit's folder against the hashes its ``edits.json`` (``man``) records (only the
    manifest's own without ``files``: a merged checkpoint verified beside it): True when they
    match; a change is refused (FactEditError naming the file); a manifest without hashes
    (written by an older factedit) is accepted with a warning through ``log`` (False)."""
    folder = Path(folder)
    where = folder / "edits.json"
    fix = "restore the folder from where it was written, or redo the edit"
    integ = man.get("integrity")
    if integ is None:
        log(f"warning: {where} records no content hashes (written by an older factedit): the folder's files are "
            "used unverified")
        return False
    if not isinstance(integ, dict) or integ.get("algorithm") != "sha256" or not isinstance(integ.get("files"), dict) \
            or not isinstance(integ.get("manifest"), str):
        raise FactEditError(f"{where}: its 'integrity' record is malformed: {fix}")
    if sha256_json({k: v for k, v in man.items() if k != "integrity"}) != integ["manifest"]:
        raise FactEditError(f"{where} was changed since factedit wrote it (its content does not match the SHA-256 "
                            f"recorded in it): {fix}")
    for name, digest in sorted(integ["files"].items() if files else ()):
        path = folder / name
        if name not in SEALED_FILES:
            raise FactEditError(f"{where}: its 'integrity' record names {shown(name)}, not a file of an edit: {fix}")
        if not path.is_file():
            raise FactEditError(f"{path} is missing (the edit's edits.json records it): {fix}")
        if sha256_file(path) != digest:
            raise FactEditError(f"{path} was changed since factedit wrote it (its SHA-256 is not the one recorded "
                                f"in edits.json): {fix}")
    return True
