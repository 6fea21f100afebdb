"""Extraction heads: which heads' own outputs at the last position put the attribute on top,
and whether a head holds the subject -> attribute mapping in its weights (OV check)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factedit.analysis.projection import Components, rank_and_prob
from factedit.models.adapter import ModelAdapter


@dataclass
class HeadScores:
    rank: torch.Tensor  # (L, H) rank of the token in each head's projection (1 = top)
    prob: torch.Tensor  # (L, H) its probability there


def head_scores(adapter: ModelAdapter, comp: Components, token: int, final_norm: bool = True) -> HeadScores:
    rank, prob = rank_and_prob(adapter, comp.heads, token, final_norm)
    return HeadScores(rank=rank, prob=prob)


def top_heads(scores: HeadScores, max_rank: int, limit: int) -> list[tuple[int, int]]:
    """Heads with rank <= max_rank, highest probability first, at most ``limit``."""
    L, H = scores.rank.shape
    cand = [(la, h) for la in range(L) for h in range(H) if int(scores.rank[la, h]) <= max_rank]
    cand.sort(key=lambda lh: -float(scores.prob[lh]))
    return cand[:limit]


@torch.no_grad()
def ov_vectors(adapter: ModelAdapter, comp: Components, position: int, heads: list[tuple[int, int]]) -> torch.Tensor:
    """(n, d): for each (layer, head), the head's OV map applied to the attention input at
    ``position`` (the subject's last token), i.e. what the head would write at the last
    position if it attended to the subject alone. Under a post-attention norm (Gemma 2/3) it
    is scaled by the norm's gain frozen at the last position's clean MHSA output, the same
    definition as the heads' own outputs (``Components.heads``)."""
    out = []
    for layer, h in heads:
        gain = None if comp.attn_gain is None else comp.attn_gain[layer]
        out.append(adapter.head_ov(layer, comp.attn_in[layer, position], gain)[h])  # (d,)
    return torch.stack(out) if out else comp.attn_in.new_zeros(0, comp.attn_in.shape[-1])


@torch.no_grad()
def ov_rank(adapter: ModelAdapter, comp: Components, position: int, heads: list[tuple[int, int]],
            token: int, final_norm: bool = True) -> list[int]:
    """For each (layer, head): the rank of ``token`` in the vocabulary projection of
    :func:`ov_vectors` (the OV check)."""
    if not heads:
        return []
    rank, _ = rank_and_prob(adapter, ov_vectors(adapter, comp, position, heads), token, final_norm)
    return [int(r) for r in rank]
