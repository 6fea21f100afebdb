"""Built pools on disk: ``$FACTEDIT_CACHE/pools`` (default ``~/.cache/factedit/pools``).

A cache file is JSONL: a header line ``{"cache": "factedit-pool", "key": {...}, "meta": {...},
"sha256": ...}`` then one row per line. The key names what was built (pool, its version, the
model's name and fingerprint, the seed, the settings); ``sha256`` covers the key, the meta and
every row. A file whose key differs, or whose content does not match its hash, is not used:
the caller rebuilds (and says why) and writes it anew, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factedit.io import atomic_write_text, dumps_json

MAGIC = "factedit-pool"
NAMED = {"pool", "version", "model", "fingerprint", "seed", "max_neighbours", "data"}  # spelled out in file names


def pools_dir() -> Path:
    return Path(os.environ.get("FACTEDIT_CACHE", Path.home() / ".cache" / "factedit")) / "pools"


def cache_path(kind: str, key: dict[str, Any]) -> Path:
    """``<pool>-v<version>-<model>-<fingerprint prefix>[-seed<S>-nb<N>][-o<options hash>]-<kind>.jsonl``."""
    parts = [str(key["pool"]), f"v{key['version']}", str(key.get("model") or "nomodel")]
    fp = str(key.get("fingerprint") or "").removeprefix("sha256:")
    parts += [fp[:12]] if fp else []
    parts += [f"seed{key['seed']}"] if "seed" in key else []
    parts += [f"nb{key['max_neighbours']}"] if "max_neighbours" in key else []
    extra = {k: v for k, v in key.items() if k not in NAMED}  # e.g. relations: a short hash tells them apart
    parts += ["o" + hashlib.sha256(dumps_json(extra, sort_keys=True).encode()).hexdigest()[:8]] if extra else []
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts + [kind]))
    return pools_dir() / f"{name}.jsonl"


def _digest(key: dict[str, Any], meta: dict[str, Any], body: str) -> str:
    head = dumps_json({"key": key, "meta": meta}, sort_keys=True)
    return hashlib.sha256((head + "\n" + body).encode("utf-8")).hexdigest()


def write_cache(path: Path, key: dict[str, Any], meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    body = "".join(dumps_json(r, ensure_ascii=False) + "\n" for r in rows)
    header = {"cache": MAGIC, "key": key, "meta": meta, "sha256": _digest(key, meta, body)}
    atomic_write_text(path, dumps_json(header, ensure_ascii=False) + "\n" + body)


def read_cache(path: Path, key: dict[str, Any],
               log: Callable[[str], None] = lambda m: None) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """``(meta, rows)`` of a cache file whose key is ``key`` and whose content matches its hash;
    None (and a message to ``log``, unless the file is simply absent) otherwise."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        first, _, body = text.partition("\n")
        header = json.loads(first)
        if not isinstance(header, dict) or header.get("cache") != MAGIC:
            raise ValueError("not a pool cache file")
        if header.get("key") != json.loads(dumps_json(key)):
            log(f"pool cache {path} was built for another key: rebuilding")
            return None
        if header.get("sha256") != _digest(header["key"], header.get("meta", {}), body):
            log(f"pool cache {path} does not match its content hash (changed or damaged): rebuilding")
            return None
        rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        log(f"pool cache {path} cannot be read ({exc}): rebuilding")
        return None
    return header.get("meta", {}), rows
