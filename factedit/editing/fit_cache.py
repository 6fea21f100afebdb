"""Resumable value fits: each fitted chunk of requests is kept on disk under a key of
everything its numbers depend on, so a long batch fit that stops (a crash, a session's end)
resumes at the first chunk not yet fitted, and the same fit serves other insertions later.

A fit of a chunk depends on: the model's weights (fingerprint), dtype and device type, the
site (MLP layer, heads, position), the fit settings (``FIT_FIELDS``), the context prefixes,
the chunk's requests, in order (the chunk stops early only when all of them are met), and the
fitting code (``VERSION``, raised whenever ``values.py`` changes what it computes). The key is
the SHA-256 of all of that; a file holds the deltas (safetensors) and the per-request NLLs
(its metadata), and a SHA-256 of that content (``sha256`` in the metadata). Files are written to a
temporary name and renamed (``factedit.io``), so a stopped run leaves no half-written entry. An
entry that cannot be read, belongs to another key, holds values that do not match its hash (it
was changed since it was written) or has no hash (an older factedit's) is fitted again and
replaced, with a message. Only safetensors is read (no pickle). The cache never goes into a
model or checkpoint folder (:func:`factedit.integrity.check_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from factedit.integrity import check_cache_dir, sha256_tensors
from factedit.io import atomic_write_bytes, dumps_json

VERSION = 1
FIT_FIELDS = ("steps", "lr", "kl_weight", "kl_prompt", "weight_decay", "clamp", "stop_nll", "n_prefixes",
              "prefix_tokens", "seed", "fit_memory_gib")


LABEL = "the fit cache (--fit-cache)"


def check_fit_cache(root: str | Path, model_dir: str | Path | None = None) -> Path:
    """``root`` as a Path; an error when it exists and is not a directory, or lies inside a model
    or checkpoint folder (``model_dir``: the base model's, or any folder above it)."""
    return check_cache_dir(root, LABEL, [Path(model_dir)] if model_dir is not None else [])


@dataclass
class FittedValues:
    """The value fit of n requests (``values.fit_values``), or of one chunk of them."""

    mlp: torch.Tensor | None  # (n, d) deltas of the MLP output
    heads: torch.Tensor | None  # (n, n_heads, head_dim) deltas of the value vectors
    nll: list[float]  # final mean target NLL per request
    base_nll: list[float]


def _floats(xs: list) -> list[float]:
    """NLLs as stored (strict JSON: a non-finite one was written as null) back to floats."""
    return [float("inf") if x is None else float(x) for x in xs]


@dataclass
class FitCache:
    """A directory of fitted chunks for one model (``fingerprint``: the weights the fits ran on)."""

    root: Path
    fingerprint: str
    hits: int = 0
    misses: int = 0
    log: Callable[[str], None] = lambda m: None
    rebuilt: int = 0  # entries found unreadable or changed, and fitted again

    def __post_init__(self) -> None:
        self.root = check_fit_cache(self.root)

    def key(self, requests: list, prefixes: list[str], sites, cfg, dtype: torch.dtype, device: torch.device) -> str:
        """The hex key of one chunk's fit (``requests``: EditRequest, ``sites``: ValueSites)."""
        what = {
            "version": VERSION, "model": self.fingerprint, "dtype": str(dtype), "device": torch.device(device).type,
            "mlp_layer": sites.mlp_layer, "heads": [list(h) for h in sites.heads],
            "position": str(getattr(sites.mlp_position, "value", sites.mlp_position)),
            "settings": {f: getattr(cfg, f) for f in FIT_FIELDS}, "prefixes": list(prefixes),
            "requests": [[r.prompt, r.subject, r.target_new] for r in requests],
        }
        if any(getattr(sites, "head_offsets", [])):  # heads written before the subject's last token
            what["head_offsets"] = list(sites.head_offsets)
        return hashlib.sha256(dumps_json(what, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"fit-{key[:40]}.safetensors"

    def load(self, key: str, device: torch.device) -> FittedValues | None:
        """The chunk's fit, or None when it must be fitted (never fitted, or an entry that is
        unreadable, of another key, changed since it was written, or without a hash)."""
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        problem = None
        try:
            tensors = load_file(str(p), device="cpu")
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            nll, base_nll = (_floats(json.loads(meta[k])) for k in ("nll", "base_nll"))
            if meta.get("key") != key:
                problem = "it belongs to another fit"
            elif "sha256" not in meta:
                problem = "it has no content hash (written by an older factedit)"
            elif sha256_tensors(tensors, [meta["key"], meta["nll"], meta["base_nll"]]) != meta["sha256"]:
                problem = "its values do not match the hash written with them (it was changed)"
            elif set(tensors) - {"mlp", "heads"} or any(not torch.isfinite(t).all() for t in tensors.values()):
                problem = "it holds unexpected or non-finite values"
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            problem = f"it cannot be read ({str(exc)[:120]})"
        if problem is not None:
            self.misses += 1
            self.rebuilt += 1
            self.log(f"fit cache entry {p}: {problem}: fitting that chunk again (the entry is replaced)")
            return None
        self.hits += 1
        return FittedValues(*(None if tensors.get(k) is None else tensors[k].to(device) for k in ("mlp", "heads")),
                            nll, base_nll)

    def save(self, key: str, fitted: FittedValues) -> None:
        """Write the chunk's fit atomically (temporary file, then rename), with its hash."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in (("mlp", fitted.mlp), ("heads", fitted.heads))
                   if v is not None}
        meta = {"key": key, "nll": dumps_json(fitted.nll), "base_nll": dumps_json(fitted.base_nll)}
        meta["sha256"] = sha256_tensors(tensors, [meta["key"], meta["nll"], meta["base_nll"]])
        atomic_write_bytes(self.path(key), safetensors_bytes(tensors, metadata=meta))
