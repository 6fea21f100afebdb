"""Attribute rate: how much of the top of a representation's vocabulary projection is
about the subject (Geva et al. 2023, section 5)."""

from __future__ import annotations

import torch

from factedit.models.adapter import ModelAdapter
from factedit.world.vocab import STOPWORDS


def keep_token(text: str) -> bool:
    """The paper's filter: no stopwords, nothing of 2 characters or fewer."""
    t = text.strip()
    return len(t) > 2 and t.lower() not in STOPWORDS


@torch.no_grad()
def top_tokens(adapter: ModelAdapter, tok, vec: torch.Tensor, k: int, final_norm: bool = True) -> list[int]:
    """The k highest-scoring token ids of ``vec``'s projection that pass ``keep_token``."""
    logits = adapter.logit_lens(vec, final_norm=final_norm).float()
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
