"""Attribute rate: how much of the top of a representation's vocabulary projection is
about the subject (Geva et al. 2023, section 5)."""

from __future__ import annotations

import torch

from factedit.analysis.hooks import upcast
from factedit.models.adapter import ModelLayout

# Function words that say nothing about a subject (the paper drops stopwords and tokens of
# two characters or fewer before taking the top tokens).
STOPWORDS = frozenset(
    "the and for with from that this was were are has had have his her its their them they "
    "who whom which what where when why how not but also into onto over under than then "
    "there here been being does did done can could would should will shall may might must "
    "one two all any some such very more most other same only own just about after before "
    "between during while because each few both".split()
)


def keep_token(text: str) -> bool:
    """The paper's filter: no stopwords, nothing of 2 characters or fewer."""
    t = text.strip()
    return len(t) > 2 and t.lower() not in STOPWORDS


_KEEP: dict[tuple[int, int], torch.Tensor] = {}


def keep_mask(tok, vocab: int) -> torch.Tensor:
    """(vocab,) bool: which token ids pass ``keep_token`` (decoded once per tokenizer)."""
    key = (id(tok), vocab)
    if key not in _KEEP:
        mask = torch.zeros(vocab, dtype=torch.bool)
        for i in range(vocab):
            try:
                mask[i] = keep_token(tok.decode([i]))
            except Exception:  # ids beyond the tokenizer (padded embedding rows)
                mask[i] = False
        _KEEP[key] = mask
    return _KEEP[key]


@torch.no_grad()
def top_tokens(adapter: ModelLayout, tok, vecs: torch.Tensor, k: int, final_norm: bool = True) -> torch.Tensor:
    """(..., k) the k highest-scoring token ids of each (..., d) vector's projection among those
    that pass ``keep_token``."""
    return top_kept(tok, upcast(adapter.logit_lens(vecs, final_norm=final_norm)), k)


def top_kept(tok, logits: torch.Tensor, k: int) -> torch.Tensor:
    """(..., k) the k highest-scoring token ids that pass ``keep_token``, of projections already
    made (..., V)."""
    mask = keep_mask(tok, logits.shape[-1]).to(logits.device)
    return logits.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices


@torch.no_grad()
def attribute_rate(adapter: ModelLayout, tok, stream: torch.Tensor, related: set[int], k: int,
                   final_norm: bool = True) -> list[float]:
    """Per vector of ``stream`` ((N, d), e.g. the layers with the embeddings first): the share of
    the top-k kept tokens that are in ``related``."""
    return rate_of(top_tokens(adapter, tok, stream, k, final_norm), related, k)


def rate_of(top: torch.Tensor, related: set[int], k: int) -> list[float]:
    """Per row of ``top`` (N, k): the share of its tokens that are in ``related``."""
    rel = torch.tensor(sorted(related), dtype=top.dtype, device=top.device)
    return (torch.isin(top, rel).sum(-1).double() / k).tolist()


def related_tokens(tok, texts: str | list[str]) -> set[int]:
    """The subject's related-token set from a text about it (the paper used its Wikipedia
    paragraphs) or a list of strings: every token of the text as the model's tokenizer splits
    it, plus each word's own token(s) with and without a leading space, so that a word counts
    whether or not the model would start it with a space. Filtered like the projection."""
    if isinstance(texts, str):
        texts = [texts]
    ids: set[int] = set()
    for text in texts:
        pieces = [text] + [w for w in text.split() if w]
        for piece in pieces:
            for variant in (piece, " " + piece.strip()):
                ids.update(tok.encode(variant, add_special_tokens=False))
    return {i for i in ids if keep_token(tok.decode([i]))}
