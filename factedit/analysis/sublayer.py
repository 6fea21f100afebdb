"""Sublayer knockout: remove the MLP (or MHSA) updates at the subject positions over a window
of layers, and measure what the subject representation and the last position lose.

Unlike the reference code (which zeroes the MLP's pre-activations at every position, so the
output bias survives, and makes attention uniform), the sublayer's whole output is removed at
the subject positions only: the residual stream there never receives that sublayer's update.

All interventions for a fact run as one batch: row 0 is the clean run, then one row per
(sublayer, centre layer). Per row we read:
- p(token) at the output (relative change in %, as for attention knockout);
- the attribute rate of the last subject token's residual at ``read_layer`` (stream index:
  0 = embeddings, l + 1 = after block l), when a related-token set is given;
- extraction: the largest probability of the token in any MHSA sublayer's projection at the
  last position (the attribute being read into the last position).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from factedit.analysis.attribute_rate import attribute_rate
from factedit.analysis.hooks import as_btd, capture, upcast
from factedit.analysis.knockout import window_layers
from factedit.analysis.spans import TokenizedPrompt
from factedit.errors import FactEditError
from factedit.models.adapter import ModelAdapter

SUBLAYERS = ("mlp", "attn")


@dataclass
class SublayerKnockoutResult:
    window: int
    read_layer: int  # stream index where the attribute rate is read
    token: int  # the token whose probability and extraction are measured
    base_prob: float
    base_attribute_rate: float | None
    base_extraction: float
    prob_change: dict[str, list[float]]  # sublayer -> per centre layer, relative change in %
    attribute_rate: dict[str, list[float]] | None  # sublayer -> per centre layer, rate at read_layer
    extraction: dict[str, list[float]]  # sublayer -> per centre layer, max MHSA p(token) at last


@contextmanager
def remove_updates(adapter: ModelAdapter, kind: str, rows_by_layer: dict[int, list[int]],
                   positions: list[int], batch: int) -> Iterator[None]:
    """Zero the output of sublayer ``kind`` ("mlp" or "attn") at ``positions`` for the batch
    rows ``rows_by_layer[layer]`` (of ``batch`` rows)."""
    getter = adapter.mlp if kind == "mlp" else adapter.attn
    handles = []
    for layer, rows in rows_by_layer.items():
        if not rows:
            continue

        def hook(module, args, out, rows=rows):
            o = out[0] if isinstance(out, tuple) else out
            shape = o.shape
            o = as_btd(o.clone(), batch)  # OPT's MLP output is (batch*T, d)
            r = torch.tensor(rows, device=o.device)[:, None]
            o[r, torch.tensor(positions, device=o.device)[None, :]] = 0
            o = o.reshape(shape)
            return (o, *out[1:]) if isinstance(out, tuple) else o

        handles.append(getter(layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sublayer_knockout(adapter: ModelAdapter, tok, tp: TokenizedPrompt, window: int, token: int,
                      related: set[int] | None = None, read_layer: int | None = None, top_k: int = 50,
                      final_norm: bool = True) -> SublayerKnockoutResult:
    L = adapter.n_layers
    if read_layer is None:
        read_layer = default_read_layer(L)
    if not 0 <= read_layer <= L:
        raise FactEditError(f"read layer {read_layer} must lie between 0 (embeddings) and {L}")
    rows = [(kind, c) for kind in SUBLAYERS for c in range(L)]
    B = 1 + len(rows)
    device = next(adapter.model.parameters()).device
    subject = list(range(*tp.subject_span))
    q, s_last = tp.last, tp.last_subject
    by_kind: dict[str, dict[int, list[int]]] = {k: {la: [] for la in range(L)} for k in SUBLAYERS}
    for r, (kind, c) in enumerate(rows, start=1):
        for la in window_layers(c, window, L):
            by_kind[kind][la].append(r)

    store: dict[str, list] = {}
    ids = torch.tensor([tp.input_ids] * B, device=device)
    with remove_updates(adapter, "mlp", by_kind["mlp"], subject, B), \
            remove_updates(adapter, "attn", by_kind["attn"], subject, B), \
            capture(adapter, {"block_in": (adapter.block, "in"), "block_out": (adapter.block, "out"),
                              "attn": (adapter.attn, "out")}, store, batch=B):
        logits = upcast(adapter.model(input_ids=ids).logits[:, q])  # (B, V)
    probs = logits.softmax(-1)[:, token]  # (B,)
    stream = [store["block_in"][0]] + store["block_out"]  # L+1 x (B, T, d)
    subj_rep = stream[read_layer][:, s_last]  # (B, d)
    attn_last = torch.stack([a[:, q] for a in store["attn"]], 1)  # (B, L, d)
    extraction = upcast(adapter.logit_lens(attn_last, final_norm)).softmax(-1)[..., token].amax(1)  # (B,)

    rates = None
    if related is not None:
        rates = [attribute_rate(adapter, tok, subj_rep[b : b + 1], related, top_k, final_norm)[0]
                 for b in range(B)]
    p0 = float(probs[0])
    out_prob: dict[str, list[float]] = {k: [] for k in SUBLAYERS}
    out_rate: dict[str, list[float]] = {k: [] for k in SUBLAYERS}
    out_ext: dict[str, list[float]] = {k: [] for k in SUBLAYERS}
    for r, (kind, _c) in enumerate(rows, start=1):
        out_prob[kind].append((float(probs[r]) - p0) / p0 * 100.0)
        out_ext[kind].append(float(extraction[r]))
        if rates is not None:
            out_rate[kind].append(rates[r])
    return SublayerKnockoutResult(
        window=window, read_layer=read_layer, token=token, base_prob=p0,
        base_attribute_rate=None if rates is None else rates[0],
        base_extraction=float(extraction[0]),
        prob_change=out_prob, attribute_rate=None if rates is None else out_rate, extraction=out_ext,
    )


def default_read_layer(n_layers: int) -> int:
    """Where the attribute rate is read after a knockout: 5/6 of the way up (the paper reads
    layer 40 of GPT-2 XL's 48)."""
    return max(1, round(5 * n_layers / 6))
