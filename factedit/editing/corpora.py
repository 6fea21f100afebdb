"""Which text the key statistics (and the context prefixes) come from.

- a world model: the world's own text;
- ``--stats-corpus FILES``: the user's text files;
- otherwise (every real model), ``sampled``: text the model itself writes, sampled at
  temperature 1 (nucleus 0.95) after a fixed list of neutral openings. It needs nothing but
  the model, so it works offline for any model; its keys follow the model's own distribution
  (ROME draws its context prefixes from the model the same way). Sampled once per model
  fingerprint and cached in ``$FACTEDIT_CACHE/corpora`` (with the texts' SHA-256). Vocabularies up to
  :data:`LARGE_VOCAB` tokens sample with ``transformers``' ``generate``; larger ones (Gemma-3's
  262,144) with :func:`nucleus_sample`, the same nucleus distribution without sorting the whole
  vocabulary at every step (``generate`` sorts it: half of each step on Gemma-3), under its own
  cache key (its random stream differs, so the cached corpora of smaller models stay valid);
- ``pydoc``: ordinary English prose that every Python ships (the standard library's
  documentation topics), as a fixed reference corpus to compare against.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from factedit.analysis.rerun import last_logits_only, output_cache, with_cache
from factedit.editing.stats import Corpus, text_files_corpus, world_corpus
from factedit.errors import FactEditError
from factedit.integrity import cache_root, sha256_json
from factedit.io import atomic_write_text, dumps_json

SAMPLED, PYDOC = "sampled", "pydoc"
LARGE_VOCAB = 131_072  # above this, nucleus_sample instead of generate
BUILTIN = (SAMPLED, PYDOC)

# neutral openings: no subject, no relation of the fact sets we edit
OPENINGS = ("The", "In the", "It was", "A", "When", "According to", "This", "There are", "After the",
            "During", "Many", "One of the", "Today,", "However,", "He", "She", "We", "They", "For",
            "On", "As a", "Although", "Most", "Some", "If you", "Over the", "By the", "At the", "Since",
            "Researchers", "The first", "In addition,")


def corpora_dir() -> Path:
    return cache_root() / "corpora"


def resolve_corpus(model, tok, world, stats_corpus: list[str | Path] | None, fingerprint: str,
                   tokens: int, log=lambda m: None) -> Corpus:
    """The corpus an edit uses: the user's files or a built-in name, else the world's text
    for a world model, else text sampled from the model."""
    names = [str(s) for s in stats_corpus or []]
    if len(names) == 1 and names[0] in BUILTIN and not Path(names[0]).exists():
        return pydoc_corpus() if names[0] == PYDOC else sampled_corpus(model, tok, fingerprint, tokens, log=log)
    if names:
        return text_files_corpus(names)
    if world is not None:
        return world_corpus(world)
    return sampled_corpus(model, tok, fingerprint, tokens, log=log)


def pydoc_corpus() -> Corpus:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FactEditError("this Python has no pydoc_data module: pass --stats-corpus with text files") from None
    texts = [topics[k] for k in sorted(topics)]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    return Corpus(f"pydoc-{digest}", texts)


def nucleus_filter(logits: torch.Tensor, top_p: float, k: int = 1024) -> torch.Tensor:
    """Probabilities (rows, vocab) of nucleus sampling: the fewest most-probable tokens whose
    mass reaches ``top_p``, renormalised, zero elsewhere. The nucleus is looked for among each
    row's top ``k`` tokens first; a row whose top ``k`` hold less than ``top_p`` is sorted in full."""
    probs = torch.softmax(logits.float(), -1)  # (rows, vocab)
    out = torch.zeros_like(probs)
    top, idx = probs.topk(min(k, probs.shape[-1]), -1)  # (rows, k), descending
    short = top.sum(-1) < top_p
    for rows, (p, i) in ((~short, (top[~short], idx[~short])),
                         (short, probs[short].sort(-1, descending=True))):
        before = p.cumsum(-1) - p  # mass of the tokens ranked above each one
        out[rows] = out[rows].scatter(-1, i, torch.where(before < top_p, p, 0.0))  # the first always stays
    return out / out.sum(-1, keepdim=True)


def _stop_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    return ids


@torch.no_grad()
def nucleus_sample(model, enc, new_tokens: int, top_p: float, stop: set[int], gen: torch.Generator) -> torch.Tensor:
    """Continuations (b, new_tokens) of the left-padded batch ``enc``, temperature 1 and
    nucleus ``top_p``, one forward per token over a KV cache, logits of the last position only;
    a row stops at a token of ``stop`` (what follows it is padding to be cut)."""
    mask = enc["attention_mask"]  # (b, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's positions start at 0
    last = last_logits_only(model)
    out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True, **last)
    done = torch.zeros(mask.shape[0], dtype=torch.bool)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long)
    new = []
    for _ in range(new_tokens):
        nxt = torch.multinomial(nucleus_filter(out.logits[:, -1].cpu(), top_p), 1, generator=gen)  # (b, 1)
        new.append(nxt)
        done |= torch.isin(nxt[:, 0], stop_ids)
        if done.all():
            break
        nxt = nxt.to(mask.device)  # the model's device (the draw is on the CPU)
        mask = torch.cat([mask, torch.ones_like(nxt)], -1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                    **last, **with_cache(model, output_cache(out)))
    return torch.cat([t.cpu() for t in new], -1)


def uses_nucleus_sampler(model) -> bool:
    """Whether :func:`sample_texts` samples with :func:`nucleus_sample` (large vocabularies)."""
    return model.get_output_embeddings().weight.shape[0] > LARGE_VOCAB


@torch.no_grad()
def sample_texts(model, tok, n_texts: int, new_tokens: int = 128, seed: int = 0, batch: int = 16) -> list[str]:
    """``n_texts`` continuations of :data:`OPENINGS` (cycled), sampled from ``model``."""
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = _stop_ids(model, tok)
    own = uses_nucleus_sampler(model)
    texts: list[str] = []
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            bar = tqdm(total=n_texts, desc="sampling statistics text", unit="text", file=sys.stderr,
                       disable=None, dynamic_ncols=True)  # shown on a terminal only, with its estimate
            for start in range(0, n_texts, batch):
                openings = [OPENINGS[i % len(OPENINGS)] for i in range(start, min(n_texts, start + batch))]
                enc = tok(openings, return_tensors="pt", padding=True).to(device)
                if own:
                    news = nucleus_sample(model, enc, new_tokens, 0.95, stop, gen)  # (b, new)
                else:
                    out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                         max_new_tokens=new_tokens, pad_token_id=pad)  # (b, T + new)
                    news = out[:, enc["input_ids"].shape[1]:]
                for row, opening in zip(news, openings):
                    new = row.tolist()
                    cut = [new.index(s) for s in (stop if own else {tok.eos_token_id}) if s in new]
                    texts.append(opening + tok.decode(new[:min(cut, default=len(new))], skip_special_tokens=True))
                bar.update(len(openings))
            bar.close()
    finally:
        tok.padding_side = side
    return texts


def sampled_corpus(model, tok, fingerprint: str, tokens: int, new_tokens: int = 128, seed: int = 0,
                   log=lambda m: None) -> Corpus:
    """Text sampled from the model, enough for ``tokens`` statistics positions (cached)."""
    n_texts = math.ceil(tokens / new_tokens * 1.15) + 1  # early EOS leaves some texts short
    key = f"{fingerprint}|{n_texts}|{new_tokens}|{seed}" + ("|nucleus-v1" if uses_nucleus_sampler(model) else "")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = corpora_dir() / f"sampled-{digest}.jsonl"
    texts = None
    if path.is_file():
        try:  # the first line holds the texts' hash; a damaged, changed or unhashed entry is sampled again
            head, *rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            texts = [str(r["text"]) for r in rows]
            if head.get("sha256") != sha256_json(texts):
                texts = None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            texts = None
        if texts is not None and len(texts) != n_texts:
            texts = None
    if texts is None:
        log(f"sampling {n_texts} texts of up to {new_tokens} tokens from the model for the key statistics "
            "(once per model; pass --stats-corpus to use your own text)")
        texts = sample_texts(model, tok, n_texts, new_tokens, seed)
        atomic_write_text(path, dumps_json({"sha256": sha256_json(texts)}) + "\n"
                          + "".join(dumps_json({"text": t}) + "\n" for t in texts))
    return Corpus(f"sampled-{digest}", texts)
