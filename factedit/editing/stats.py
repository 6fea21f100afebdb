"""Second-moment statistics of keys, C = E[k k^T], streamed from a text corpus and cached.

Keys are the inputs of the projection an edit changes: the MLP output projection's input
("mlp") or the attention module's (normed) input ("attn", read by the value projection).
All requested layers are gathered in the same forward passes, several windows per pass; a pass
stops after the highest requested layer (no later block, no unembedding), and each batch's
products are taken in the keys' precision (float32 at least) and summed across batches in
float64 on the CPU. The cache lives in
``$FACTEDIT_CACHE`` (default ``~/.cache/factedit``)/stats, one safetensors file per
(model fingerprint, kind, layer, corpus, sample count, length), written atomically with a
SHA-256 of its content; an entry that does not match it (or has none) is computed again.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from factedit.analysis.hooks import Hooks, first_input
from factedit.errors import FactEditError
from factedit.integrity import cache_root, sha256_tensors
from factedit.io import atomic_write_bytes, read_text
from factedit.models.adapter import ModelLayout, context_length


@dataclass(frozen=True)
class Corpus:
    """A named, deterministic stream of texts."""

    name: str  # part of the cache key: it must change when the texts do
    texts: Iterable[str]


def world_corpus(world, seed: int = 0, n: int = 4000) -> Corpus:
    """The demo world's own text: biographies, index lines and template sentences."""
    from factedit.world.corpus import bio_text, index_text, query_example

    def gen() -> Iterator[str]:
        rng = random.Random(seed)
        for i in range(n):
            e = rng.choice(world.entities)
            kind = i % 3
            if kind == 0:
                yield bio_text(world, e, rng)
            elif kind == 1:
                yield index_text(world, e, rng)
            else:
                p, a = query_example(world, e, rng, prefix_prob=0.5)
                yield p + a + "."

    digest = hashlib.sha256(f"{world.seed}|{len(world.entities)}|{seed}|{n}".encode()).hexdigest()[:12]
    return Corpus(f"world-{digest}", list(gen()))


def text_files_corpus(paths: list[str | Path]) -> Corpus:
    """Local text: .txt files (one document per file, or per blank-line-separated paragraph)
    and .jsonl files with a "text" field."""
    import json

    texts: list[str] = []
    h = hashlib.sha256()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FactEditError(f"--stats-corpus {p} does not exist: give text files or a folder of them")
    for f in files:
        raw = read_text(f, "--stats-corpus file")
        h.update(f.name.encode() + hashlib.sha256(raw.encode()).digest())
        if f.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        texts.append(str(json.loads(line)["text"]))
                        texts[-1].encode("utf-8")  # a JSON "\ud800" escape is no text
                    except (ValueError, KeyError, TypeError) as exc:  # (UnicodeEncodeError is a ValueError)
                        raise FactEditError(f"--stats-corpus file {f} line {i}: expected a JSON object with a 'text' "
                                            "field of valid text") from exc
        else:
            texts += [t for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise FactEditError(f"--stats-corpus {', '.join(map(str, paths))} holds no text")
    return Corpus(f"files-{h.hexdigest()[:12]}", texts)


def cache_dir() -> Path:
    return cache_root() / "stats"


def _read_cached(path: Path) -> torch.Tensor:
    """A cached C, checked against the hash written with it (ValueError: changed, or no hash)."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("sha256") != sha256_tensors(tensors) or not torch.isfinite(tensors["C"]).all():
        raise ValueError(f"{path} does not match its content hash")
    return tensors["C"]


def _cache_path(fingerprint: str, kind: str, layer: int, corpus: Corpus, samples: int, max_length: int) -> Path:
    key = f"{fingerprint}|{kind}|{layer}|{corpus.name}|{samples}|{max_length}|bos-windows"
    return cache_dir() / f"{kind}{layer}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


@dataclass
class StatsReport:
    corpus: str  # the corpus's name (its source and a digest of its texts)
    computed: list[tuple[str, int]]
    cached: list[tuple[str, int]]
    seconds: float
    tokens: int


@torch.no_grad()
def second_moments(adapter: ModelLayout, tok, corpus: Corpus, sites: list[tuple[str, int]], fingerprint: str,
                   samples: int = 20000, max_length: int = 128, use_cache: bool = True,
                   progress: bool = True, batch: int = 8) -> tuple[dict[tuple[str, int], torch.Tensor], StatsReport]:
    """C for each (kind, layer) in ``sites``: (n_in, n_in) float32 on the model's device."""
    device = next(adapter.model.parameters()).device
    context = context_length(adapter.model)
    if context:
        max_length = min(max_length, int(context))
    out: dict[tuple[str, int], torch.Tensor] = {}
    todo = []
    for site in dict.fromkeys(sites):
        path = _cache_path(fingerprint, *site, corpus, samples, max_length)
        try:
            if use_cache and path.is_file():
                out[site] = _read_cached(path).to(device)
                continue
        except (SafetensorError, OSError, KeyError, ValueError):
            pass  # an unreadable, changed or unhashed cache entry is computed again (and replaced)
        todo.append(site)
    report = StatsReport(corpus=corpus.name, computed=todo, cached=[s for s in sites if s not in todo],
                         seconds=0.0, tokens=0)
    if not todo:
        return out, report

    t0 = time.perf_counter()
    acc: dict[tuple[str, int], torch.Tensor] = {}
    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    getters = {"mlp": adapter.mlp_out, "attn": adapter.attn}
    seen = {"n": 0}
    skip = len(bos_prefix(tok))  # the BOS position is the model's, not the corpus's

    def hook(module, args, kwargs, site):
        x = first_input(args, kwargs)[:, skip:]  # (b, T - skip, n_in)
        x = x.reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # (b * (T - skip), n_in)
        if site not in acc:
            acc[site] = torch.zeros(x.shape[-1], x.shape[-1], dtype=acc_dtype, device=x.device)
        add_upper_gram(acc[site], x)

    with tqdm(total=samples, desc=f"key statistics ({len(todo)} sites)", unit="tok", file=sys.stderr,
              disable=not progress) as bar, Hooks() as hooks:
        for kind, layer in todo:
            hooks.pre(getters[kind](layer), partial(hook, site=(kind, layer)))
        hooks.post(adapter.block(max(layer for _k, layer in todo)), _stop)  # nothing above is needed
        for rows in _batches(_chunks(tok, corpus.texts, max_length), samples, batch):
            try:
                adapter.model(input_ids=torch.tensor(rows, device=device))  # (b, T): one pass, every site
            except _Stop:
                pass
            n = sum(len(r) - skip for r in rows)
            seen["n"] += n
            bar.update(n)
    if seen["n"] == 0:
        raise FactEditError(f"statistics corpus {corpus.name} gave no tokens")
    for site in todo:
        c = (symmetric_from_upper(acc[site]) / seen["n"]).float()
        out[site] = c
        if use_cache:
            path = _cache_path(fingerprint, *site, corpus, samples, max_length)
            tensors = {"C": c.contiguous().cpu()}
            atomic_write_bytes(path, safetensors_bytes(tensors, metadata={
                "tokens": str(seen["n"]), "corpus": corpus.name, "sha256": sha256_tensors(tensors)}))
    report.seconds = time.perf_counter() - t0
    report.tokens = seen["n"]
    return out, report


GRAM_BLOCKS = 4  # column blocks of x^T x: only the blocks on and above the diagonal are computed


def _edges(n: int) -> list[int]:
    blocks = GRAM_BLOCKS if n >= 256 else 1
    return [round(i * n / blocks) for i in range(blocks + 1)]


def add_upper_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc (n, n) += the blocks on and above the diagonal of x^T x, x (m, n): 5/8 of the
    products of the whole matrix with 4 blocks (see :func:`symmetric_from_upper`)."""
    edges = _edges(x.shape[-1])
    for a, b in zip(edges, edges[1:]):
        acc[a:b, a:] += (x[:, a:b].T @ x[:, a:]).to(acc.dtype)


def symmetric_from_upper(acc: torch.Tensor) -> torch.Tensor:
    """The whole symmetric matrix from what :func:`add_upper_gram` summed."""
    out = acc.clone()
    edges = _edges(acc.shape[-1])
    for a, b in zip(edges, edges[1:]):
        out[b:, a:b] = acc[a:b, b:].T
    return out


class _Stop(Exception):
    """Raised after the highest requested layer: nothing above it is needed."""


def _stop(module, args, out):
    raise _Stop


def _batches(chunks: Iterator[list[int]], samples: int, batch: int) -> Iterator[list[list[int]]]:
    """Windows of equal length grouped ``batch`` at a time (no padding: a shorter window, the
    corpus's last or the one cut at ``samples`` tokens, goes alone), ``samples`` tokens in all."""
    left, group = samples, []
    for chunk in chunks:
        chunk = chunk[:left]
        left -= len(chunk)
        if group and len(chunk) != len(group[0]):
            yield group
            group = []
        group.append(chunk)
        if len(group) == batch:
            yield group
            group = []
        if left <= 0:
            break
    if group:
        yield group


def bos_prefix(tok) -> list[int]:
    """``[BOS]`` when the tokenizer starts every input with it (Llama, Gemma), else ``[]``
    (GPT-2). Models trained that way treat position 0 as a sink; a window without it is input
    the model never sees."""
    ids = tok("a")["input_ids"]
    bos = tok.bos_token_id
    return [bos] if bos is not None and ids and ids[0] == bos else []


def _chunks(tok, texts: Iterable[str], max_length: int) -> Iterator[list[int]]:
    """The texts' tokens (no special tokens), concatenated with the EOS token between
    documents, cut into windows of ``max_length`` tokens that each start with the tokenizer's
    BOS where it uses one (so no BOS lands mid-window; its position is not counted)."""
    prefix = bos_prefix(tok)
    width = max_length - len(prefix)
    buf: list[int] = []
    eos = tok.eos_token_id
    for t in texts:
        buf += tok(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        while len(buf) >= width:
            yield prefix + buf[:width]
            buf = buf[width:]
    if buf:
        yield prefix + buf
