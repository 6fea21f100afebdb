"""Attention knockout (Geva et al. 2023): block edges into the last position.

For each source set (subject tokens, non-subject tokens, the last token itself) and each
centre layer l, the edges last position -> source are blocked in all heads of the layers
``window_layers(l, k, L)`` by adding the dtype's minimum to those attention logits before the
softmax. The measure is the relative change, in %, of the probability of the clean run's
top-1 token (and of a given target token).

All interventions for a fact run as one batch: row 0 is the clean run, then one row per
(source set, centre layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from factedit.analysis.hooks import attention_masks, causal_mask, upcast
from factedit.analysis.spans import TokenizedPrompt
from factedit.errors import FactEditError
from factedit.models.adapter import ModelAdapter

SOURCE_SETS = ("subject", "non_subject", "last")


def window_layers(center: int, k: int, n_layers: int) -> range:
    """Layers max(0, l - floor((k-1)/2)) .. min(L-1, l + ceil((k-1)/2))."""
    if k < 1 or k > n_layers:
        raise FactEditError(f"knockout window {k} must lie between 1 and the model's {n_layers} layers")
    lo = max(0, center - (k - 1) // 2)
    hi = min(n_layers - 1, center + math.ceil((k - 1) / 2))
    return range(lo, hi + 1)


def source_positions(tp: TokenizedPrompt) -> dict[str, list[int]]:
    s0, s1 = tp.subject_span
    q = tp.last
    return {
        "subject": list(range(s0, s1)),
        "non_subject": [i for i in range(q) if not s0 <= i < s1],
        "last": [q],
    }


@dataclass
class KnockoutResult:
    window: int
    prediction: int  # clean top-1 token id
    base_prob: float
    curves: dict[str, list[float]]  # source set -> per centre layer, relative change in %
    target: int | None = None
    target_base_prob: float | None = None
    target_curves: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def attention_knockout(adapter: ModelAdapter, tp: TokenizedPrompt, window: int,
                       target: int | None = None) -> KnockoutResult:
    L = adapter.n_layers
    T = len(tp.input_ids)
    q = tp.last
    sources = source_positions(tp)
    rows = [(s, c) for s in SOURCE_SETS for c in range(L)]
    B = 1 + len(rows)
    device = next(adapter.model.parameters()).device
    dtype = torch.float32
    neg = torch.finfo(dtype).min
    base = causal_mask(B, T, dtype, device)
    masks = []
    for layer in range(L):
        m = base.clone()
        for r, (s, c) in enumerate(rows, start=1):
            if layer in window_layers(c, window, L) and sources[s]:
                m[r, 0, q, sources[s]] = neg
        masks.append(m)
    ids = torch.tensor([tp.input_ids] * B, device=device)
    with attention_masks(adapter, lambda layer: masks[layer]):
        logits = upcast(adapter.model(input_ids=ids).logits[:, q])  # (B, V)
    probs = logits.softmax(-1)
    pred = int(probs[0].argmax())

    def curves_for(tok_id: int) -> tuple[float, dict[str, list[float]]]:
        p0 = float(probs[0, tok_id])
        out: dict[str, list[float]] = {s: [] for s in SOURCE_SETS}
        for r, (s, _c) in enumerate(rows, start=1):
            out[s].append((float(probs[r, tok_id]) - p0) / p0 * 100.0)
        return p0, out

    p0, curves = curves_for(pred)
    res = KnockoutResult(window, pred, p0, curves)
    if target is not None:
        res.target = target
        res.target_base_prob, res.target_curves = curves_for(target)
    return res
