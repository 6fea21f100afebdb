"""Extraction heads: which heads' own outputs at the last position put the attribute on top,
and whether a head holds the subject -> attribute mapping in its weights (OV check)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factedit.analysis.hooks import upcast
from factedit.analysis.projection import Components, rank_and_prob
from factedit.models.adapter import ModelLayout

# A candidate token counts as beating the token in the screening only by more than this much
# (relative to the logit's size): room for the rounding of a product taken in another shape.
SCREEN_MARGIN = 1e-4


@dataclass
class HeadScores:
    rank: torch.Tensor  # (L, H) rank of the token in each head's projection (1 = top)
    prob: torch.Tensor  # (L, H) its probability there


def head_scores(adapter: ModelLayout, comp: Components, token: int, final_norm: bool = True) -> HeadScores:
    rank, prob = rank_and_prob(adapter, comp.heads, token, final_norm)
    return HeadScores(rank=rank, prob=prob)


@torch.no_grad()
def extraction_head_scores(adapter: ModelLayout, comp: Components, token: int, final_norm: bool, max_rank: int,
                           refs: torch.Tensor, k: int = 64) -> HeadScores:
    """:func:`head_scores` for the heads that can rank ``token`` within ``max_rank`` (the
    candidates of :func:`top_heads`); every other head gets rank -1 and probability 0.

    A head is ruled out, exactly, when at least ``max_rank`` tokens beat the token in its own
    projection. Those tokens are looked for among the top-k of reference projections ``refs``
    (M, V) (the clean MHSA outputs and the output logits): a head's logits for them cost
    |S| x d instead of V x d. The heads not ruled out are projected in full."""
    L, H, d = comp.heads.shape
    vecs = comp.heads.reshape(L * H, d)  # (L*H, d)
    unembed = adapter.unembed
    cand = refs.topk(min(k, refs.shape[-1]), dim=-1).indices.unique()
    ids = torch.cat([torch.tensor([token], device=cand.device), cand[cand != token]])  # token first
    u = adapter.unembed_input(vecs, final_norm)
    logits = upcast(u @ unembed.weight[ids].T.to(u.dtype))  # (L*H, |S|+1)
    if unembed.bias is not None:
        logits = logits + upcast(unembed.bias[ids])
    logits = adapter.softcap(logits)
    lt = logits[:, :1]
    beat = (logits[:, 1:] > lt + SCREEN_MARGIN * (lt.abs() + 1)).sum(-1)  # (L*H,)
    keep = (beat < max_rank).nonzero().squeeze(1)
    rank = torch.full((L * H,), -1, dtype=torch.long, device=vecs.device)
    prob = torch.zeros(L * H, dtype=upcast(lt).dtype, device=vecs.device)
    if len(keep):
        r, p = rank_and_prob(adapter, vecs[keep], token, final_norm)
        rank[keep], prob[keep] = r, p.to(prob.dtype)
    return HeadScores(rank=rank.view(L, H), prob=prob.view(L, H))


def top_heads(scores: HeadScores, max_rank: int, limit: int) -> list[tuple[int, int]]:
    """Heads with rank <= max_rank, highest probability first, at most ``limit`` (a rank of -1
    is a head ruled out, see :func:`extraction_head_scores`)."""
    L, H = scores.rank.shape
    cand = [(la, h) for la in range(L) for h in range(H) if 1 <= int(scores.rank[la, h]) <= max_rank]
    cand.sort(key=lambda lh: -float(scores.prob[lh]))
    return cand[:limit]


@torch.no_grad()
def ov_vectors(adapter: ModelLayout, comp: Components, position: int, heads: list[tuple[int, int]]) -> torch.Tensor:
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
def ov_rank(adapter: ModelLayout, comp: Components, position: int, heads: list[tuple[int, int]],
            token: int, final_norm: bool = True) -> list[int]:
    """For each (layer, head): the rank of ``token`` in the vocabulary projection of
    :func:`ov_vectors` (the OV check)."""
    if not heads:
        return []
    rank, _ = rank_and_prob(adapter, ov_vectors(adapter, comp, position, heads), token, final_norm)
    return [int(r) for r in rank]
