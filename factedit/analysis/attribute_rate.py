"""Attribute rate: how much of the top of a representation's vocabulary projection is
about the subject (Geva et al. 2023, section 5)."""

from __future__ import annotations

import torch

from factedit.analysis.hooks import upcast
from factedit.models.adapter import ModelAdapter

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


@torch.no_grad()
def top_tokens(adapter: ModelAdapter, tok, vec: torch.Tensor, k: int, final_norm: bool = True) -> list[int]:
    """The k highest-scoring token ids of ``vec``'s projection that pass ``keep_token``."""
    logits = upcast(adapter.logit_lens(vec, final_norm=final_norm))
    kept: list[int] = []
    for i in logits.argsort(descending=True).tolist():
        if keep_token(tok.decode([i])):
            kept.append(i)
            if len(kept) == k:
                break
    return kept


def attribute_rate(adapter: ModelAdapter, tok, stream: torch.Tensor, related: set[int], k: int,
                   final_norm: bool = True) -> list[float]:
    """Per layer of ``stream`` ((L+1, d), embeddings first): the share of the top-k kept tokens
    that are in ``related``."""
    return [sum(t in related for t in top_tokens(adapter, tok, v, k, final_norm)) / k for v in stream]


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
