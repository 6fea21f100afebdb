"""Vocabulary projections computed only as far as a measure needs them.

The unembedding is the largest matrix of a small model (49,152 x 576 on SmolLM2, 262,144 x 640
on Gemma-3): projecting one vector costs about a fifth of a token's whole forward pass. Some
measures need a probability only through a maximum, e.g. the sublayer knockout's extraction
(the largest p(token) over the layers of a row). There an exact upper bound of each
candidate's probability, from a few hundred logits, rules out most candidates, and only the
rest are projected in full, exactly as before (so the maximum is the same number).

The bound. For a vector with logits l (V,) and the token t,

    p_t = exp(l_t) / sum_j exp(l_j) <= exp(l_t) / (exp(l_t) + sum_{j in S} exp(l_j) + n_C exp(mean_C l))

for any set S of other tokens and its complement C (Jensen: the mean of exp is at least exp of
the mean). S is the top-k of a reference vector's projection (the clean run's at the same
layer), whose logits are computed exactly; mean_C l is linear in the unembedding's input, so it
costs one dot product with the complement's summed unembedding rows. Under a final logit
softcap the Jensen term is left out (the cap is not linear); the bound still holds.
"""

from __future__ import annotations

import torch

from factedit.analysis.hooks import upcast
from factedit.models.adapter import ModelLayout

# A candidate is ruled out when its bound, widened by this factor, is still below the best
# exact value: room for the float32 rounding of the bound's own dot products (~1e-6).
MARGIN = 1e-3


def token_prob(adapter: ModelLayout, vecs: torch.Tensor, token: int, final_norm: bool = True) -> torch.Tensor:
    """(N,) p(token) in the full vocabulary projection of each (N, d) vector."""
    return upcast(adapter.logit_lens(vecs, final_norm)).softmax(-1)[:, token]


def prunable(adapter: ModelLayout) -> bool:
    """Bounds are used in float32 and float64 only: in half precision the exact path's own
    logits are rounded by far more than the margin, and everything is projected in full."""
    return adapter.unembed.weight.dtype in (torch.float32, torch.float64)


@torch.no_grad()
def prob_upper_bounds(adapter: ModelLayout, ref_logits: torch.Tensor, vecs: torch.Tensor, ref: torch.Tensor,
                      token: int, final_norm: bool = True, k: int = 128) -> torch.Tensor:
    """(N,) an upper bound of p(token) in the projection of each vector of ``vecs`` (N, d),
    from the top-k tokens of its reference projection ``ref_logits[ref[i]]`` (M, V) (see the
    module's docstring)."""
    unembed = adapter.unembed
    W = upcast(unembed.weight)  # (V, d)
    b = None if unembed.bias is None else upcast(unembed.bias)  # (V,)
    V = W.shape[0]
    k = min(k, V - 1)
    cap = adapter.logit_softcap
    u = upcast(adapter.unembed_input(vecs, final_norm))  # (N, d)
    lt = u @ W[token] + (0.0 if b is None else b[token])  # (N,)
    if cap is not None:
        lt = torch.tanh(lt / cap) * cap
    out = torch.empty_like(lt)
    w_sum = W.sum(0)  # (d,)
    b_sum = 0.0 if b is None else b.sum()
    for m in ref.unique().tolist():
        sel = (ref == m).nonzero().squeeze(1)
        top = ref_logits[m].topk(k).indices  # (k,)
        top = top[top != token]
        lS = u[sel] @ W[top].T + (0.0 if b is None else b[top])  # (n, |S|)
        terms = [lS, lt[sel, None]]
        if cap is not None:
            terms[0] = torch.tanh(lS / cap) * cap
        else:  # Jensen on the complement C = V \ (S + token)
            n_c = V - len(top) - 1
            if n_c > 0:
                c_w = (w_sum - W[top].sum(0) - W[token]) / n_c  # (d,)
                c_b = 0.0 if b is None else (b_sum - b[top].sum() - b[token]) / n_c
                terms.append((u[sel] @ c_w + c_b + torch.log(torch.tensor(float(n_c))))[:, None])
        out[sel] = (lt[sel] - torch.logsumexp(torch.cat(terms, 1), 1)).exp()
    return out


@torch.no_grad()
def max_token_prob(adapter: ModelLayout, ref_logits: torch.Tensor, vecs: torch.Tensor, ref: torch.Tensor,
                   group: torch.Tensor, floor: torch.Tensor, token: int, final_norm: bool = True,
                   k: int = 128) -> torch.Tensor:
    """(R,) for each group g: the larger of ``floor[g]`` and the largest p(token) in the full
    projection of the vectors ``vecs`` (N, d) with ``group == g``. Equal to projecting every
    vector; only the vectors whose upper bound (against the top-k tokens of reference
    projection ``ref_logits[ref[i]]``, (M, V)) could reach their group's best are projected."""
    best = floor.clone().to(torch.float64)
    if len(vecs) == 0:
        return best
    if not prunable(adapter):
        return torch.maximum(best, _group_max(token_prob(adapter, vecs, token, final_norm), group, len(best)))
    bound = prob_upper_bounds(adapter, ref_logits, vecs, ref, token, final_norm, k).double() * (1 + MARGIN)
    done = torch.zeros(len(vecs), dtype=torch.bool, device=vecs.device)
    # round 1: each group's most promising candidate; round 2: whatever its exact value leaves open
    first = _group_argmax(bound, group, len(best))
    first = first[(first >= 0)]
    first = first[bound[first] > best[group[first]]]
    for idx in (first, None):
        if idx is None:
            idx = ((bound > best[group]) & ~done).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        p = token_prob(adapter, vecs[idx], token, final_norm).double()
        done[idx] = True
        best = torch.maximum(best, _group_max(p, group[idx], len(best)))
    return best


def _group_max(values: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the largest value of each group (-inf where a group has none)."""
    out = torch.full((n,), float("-inf"), dtype=torch.float64, device=values.device)
    return out.scatter_reduce(0, group, values.double(), reduce="amax")


def _group_argmax(values: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the index of each group's largest value (-1 where a group has none)."""
    top = _group_max(values, group, n)
    hit = values.double() == top[group]
    idx = torch.full((n,), -1, dtype=torch.long, device=values.device)
    pos = torch.arange(len(values), device=values.device)
    return idx.scatter_reduce(0, group[hit], pos[hit], reduce="amax")
