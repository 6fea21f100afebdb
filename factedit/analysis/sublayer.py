"""Sublayer knockout: remove the MLP (or MHSA) updates at the subject positions over a window
of layers, and measure what the subject representation and the last position lose.

Unlike the reference code (which zeroes the MLP's pre-activations at every position, so the
output bias survives, and makes attention uniform), the sublayer's whole output is removed at
the subject positions only: the residual stream there never receives that sublayer's update
(after the family's post-norm where it has one, see ``ModelLayout.to_residual``).

Row 0 is the clean run, then one row per (sublayer, centre layer). Positions before the
subject never change, so by default each row reruns the positions from the subject on, from
its window's first layer up, on the clean run's keys and values, all rows in one batch. Per row we read:
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
from functools import partial
from typing import Any

import torch

from factedit.analysis.attribute_rate import attribute_rate
from factedit.analysis.hooks import Hooks, as_btd, capture, first_output, upcast, with_output
from factedit.analysis.knockout import window_layers
from factedit.analysis.rerun import CleanRun, clean_run, rerun
from factedit.analysis.spans import TokenizedPrompt
from factedit.analysis.vocab import max_token_prob, token_prob
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout

SUBLAYERS = ("mlp", "attn")


@dataclass
class SublayerKnockoutResult:
    window: int
    read_layer: int  # stream index where the attribute rate is read
    token: int  # the token whose probability and extraction are measured
    base_prob: float
    base_attribute_rate: float | None
    base_extraction: float | None  # None when not asked for
    prob_change: dict[str, list[float]]  # sublayer -> per centre layer, relative change in %
    attribute_rate: dict[str, list[float]] | None  # sublayer -> per centre layer, rate at read_layer
    extraction: dict[str, list[float]] | None  # sublayer -> per centre layer, max MHSA p(token) at last

    def to_dict(self) -> dict[str, Any]:
        """The layout circuit.json keeps: per sublayer its three curves (None where not
        measured); ``token`` is left out (it is the circuit's ``target_id``)."""
        def per(curves: dict[str, list[float]] | None, kind: str) -> list[float] | None:
            return None if curves is None else list(curves[kind])

        return {"window": self.window, "read_layer": self.read_layer, "base_prob": self.base_prob,
                "base_attribute_rate": self.base_attribute_rate, "base_extraction": self.base_extraction,
                **{k: {"prob_change": list(self.prob_change[k]), "extraction": per(self.extraction, k),
                       "attribute_rate": per(self.attribute_rate, k)} for k in SUBLAYERS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], token: int) -> SublayerKnockoutResult:
        """The inverse of ``to_dict``, for the measured ``token``."""
        def curves(name: str) -> dict[str, list[float]] | None:
            by_kind = {k: d[k][name] for k in SUBLAYERS}
            return None if all(v is None for v in by_kind.values()) else by_kind

        return cls(window=d["window"], read_layer=d["read_layer"], token=token, base_prob=d["base_prob"],
                   base_attribute_rate=d["base_attribute_rate"], base_extraction=d["base_extraction"],
                   prob_change={k: d[k]["prob_change"] for k in SUBLAYERS},
                   attribute_rate=curves("attribute_rate"), extraction=curves("extraction"))


@contextmanager
def remove_updates(adapter: ModelLayout, kind: str, rows_by_layer: dict[int, list[int]],
                   positions: list[int], batch: int | dict[int, int]) -> Iterator[None]:
    """Zero what sublayer ``kind`` ("mlp" or "attn") adds to the residual at ``positions`` for
    the batch rows ``rows_by_layer[layer]``. ``batch`` is the number of rows the module sees
    (per layer where it varies)."""

    def zero(module, args, out, rows, n):
        o = first_output(out)
        shape = o.shape
        o = as_btd(o.clone(), n)  # OPT's MLP output is (batch*T, d)
        r = torch.tensor(rows, device=o.device)[:, None]
        o[r, torch.tensor(positions, device=o.device)[None, :]] = 0
        return with_output(out, o.reshape(shape))

    with Hooks() as hooks:
        for layer, rows in rows_by_layer.items():
            if rows:
                n = batch[layer] if isinstance(batch, dict) else batch
                hooks.post(adapter.to_residual(kind, layer), partial(zero, rows=rows, n=n))
        yield


def sublayer_rows(n_layers: int) -> list[tuple[str, int]]:
    """One row per (sublayer, centre layer), in SUBLAYERS order."""
    return [(kind, c) for kind in SUBLAYERS for c in range(n_layers)]


@torch.no_grad()
def sublayer_knockout(adapter: ModelLayout, tok, tp: TokenizedPrompt, window: int, token: int,
                      related: set[int] | None = None, read_layer: int | None = None, top_k: int = 50,
                      final_norm: bool = True, method: str = "fast",
                      clean: CleanRun | None = None, extraction: bool = True,
                      clean_attn_logits: torch.Tensor | None = None) -> SublayerKnockoutResult:
    """``method="fast"`` reruns positions from the subject's first token on, each row from its
    window's first layer, on the clean run's keys and values; ``"naive"`` runs one full forward
    pass per intervention (the reference). Without ``related`` the attribute rate is not
    measured, and with ``extraction=False`` neither is the extraction (nothing of either is
    computed). ``clean_attn_logits`` (L, V), the clean MHSA outputs' projection at the last
    position, is reused when the caller has it."""
    L = adapter.n_layers
    if read_layer is None:
        read_layer = default_read_layer(L)
    if not 0 <= read_layer <= L:
        raise FactEditError(f"read layer {read_layer} must lie between 0 (embeddings) and {L}")
    rows = sublayer_rows(L)
    windows = [window_layers(c, window, L) for _k, c in rows]
    if method == "fast":
        logits, subj_rep, attn_last = _fast(adapter, tp, rows, windows, read_layer, clean,
                                            keep_subject=related is not None, keep_attn=extraction)
    elif method == "naive":
        logits, subj_rep, attn_last = _naive(adapter, tp, rows, windows, read_layer)
    else:
        raise FactEditError(f"sublayer knockout method must be 'fast' or 'naive', not {method!r}")
    probs = upcast(logits).softmax(-1)[:, token]  # (B,)
    # the naive reference projects every layer of every row in full; the fast path skips what is
    # clean and what an upper bound rules out
    starts = [w.start for w in windows] if method == "fast" else [0] * len(windows)
    ext = None
    if extraction:
        ext = _extraction(adapter, attn_last, starts, token, final_norm, prune=method == "fast",
                          clean_logits=clean_attn_logits)  # (B,)

    rates = None
    if related is not None:
        rates = attribute_rate(adapter, tok, subj_rep, related, top_k, final_norm)  # (B,)
    p0 = float(probs[0])
    out_prob: dict[str, list[float]] = {k: [] for k in SUBLAYERS}
    out_rate: dict[str, list[float]] = {k: [] for k in SUBLAYERS}
    out_ext: dict[str, list[float]] = {k: [] for k in SUBLAYERS}
    for r, (kind, _c) in enumerate(rows, start=1):
        out_prob[kind].append((float(probs[r]) - p0) / p0 * 100.0)
        if ext is not None:
            out_ext[kind].append(float(ext[r]))
        if rates is not None:
            out_rate[kind].append(rates[r])
    return SublayerKnockoutResult(
        window=window, read_layer=read_layer, token=token, base_prob=p0,
        base_attribute_rate=None if rates is None else rates[0],
        base_extraction=None if ext is None else float(ext[0]),
        prob_change=out_prob, attribute_rate=None if rates is None else out_rate,
        extraction=None if ext is None else out_ext,
    )


def _extraction(adapter: ModelLayout, attn_last: torch.Tensor, starts: list[int], token: int,
                final_norm: bool, prune: bool = True, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the largest p(token) over layers in the projection of the MHSA output at the last
    position, ``attn_last`` (B, L, d), row 0 clean. A row's MHSA outputs below its window's
    first layer read only states the knockout has not reached, so they are the clean row's:
    only layers from the window's first one up are candidates. With ``prune``, a candidate is
    projected in full only when an exact upper bound of its p(token) could beat its row's best
    (:func:`factedit.analysis.vocab.max_token_prob`); the result is the same maximum."""
    B, L, _ = attn_last.shape
    if clean_logits is None:
        clean_logits = upcast(adapter.logit_lens(attn_last[0], final_norm))  # (L, V)
    clean_p = clean_logits.softmax(-1)[:, token].double()  # (L,)
    floor = torch.stack([clean_p.max()] + [clean_p[:lo].max() if lo else clean_p.new_tensor(float("-inf"))
                                           for lo in starts])  # (B,)
    device = attn_last.device
    vecs = torch.cat([attn_last[r, lo:] for r, lo in enumerate(starts, start=1)])  # (N, d)
    layer = torch.cat([torch.arange(lo, L, device=device) for lo in starts])  # (N,)
    group = torch.cat([torch.full((L - lo,), r, device=device) for r, lo in enumerate(starts, start=1)])
    if not prune:
        p = token_prob(adapter, vecs, token, final_norm).double()
        return torch.maximum(floor, floor.new_full((B,), float("-inf")).scatter_reduce(0, group, p, reduce="amax"))
    return max_token_prob(adapter, clean_logits, vecs, layer, group, floor, token, final_norm)


def _fast(adapter, tp, rows, windows, read_layer, clean, keep_subject: bool = True, keep_attn: bool = True):
    """Returns logits (B, V) at the last position, the last subject token's residual at
    ``read_layer`` (B, d) and the MHSA outputs at the last position (B, L, d); row 0 clean.
    The last two are None unless kept."""
    s0, s_last = tp.subject_span[0], tp.last_subject
    clean = clean or clean_run(adapter, tp.input_ids)
    subject_rel = list(range(0, tp.subject_span[1] - s0))  # subject positions, counted from s0

    def hooks(layer: int, active: list[int]) -> list:
        out = []
        for kind in SUBLAYERS:
            local = [i for i, r in enumerate(active) if rows[r][0] == kind and layer in windows[r]]
            if local:
                out.append(remove_updates(adapter, kind, {layer: local}, subject_rel, len(active)))
        return out

    res = rerun(adapter, clean, s0, [w.start for w in windows], hooks=hooks,
                keep_stream=[(read_layer, s_last)] if keep_subject else [], keep_attn_last=keep_attn)
    logits = torch.cat([clean.logits[None], res.logits])
    subj_rep = attn_last = None
    if keep_subject:
        subj_rep = torch.cat([clean.block_in[read_layer][s_last][None], res.stream[(read_layer, s_last)]])
    if keep_attn:
        clean_attn = torch.stack([a[-1] for a in clean.attn])  # (L, d)
        attn_last = torch.cat([clean_attn[None], res.attn_last])
    return logits, subj_rep, attn_last


def _naive(adapter, tp, rows, windows, read_layer):
    device = next(adapter.model.parameters()).device
    ids = torch.tensor([tp.input_ids], device=device)
    subject = list(range(*tp.subject_span))
    logits, subj_rep, attn_last = [], [], []
    for r in range(len(rows) + 1):
        by_kind = {k: {} for k in SUBLAYERS}
        if r:
            kind, _c = rows[r - 1]
            by_kind[kind] = {la: [0] for la in windows[r - 1]}
        store: dict[str, list] = {}
        with remove_updates(adapter, "mlp", by_kind["mlp"], subject, 1), \
                remove_updates(adapter, "attn", by_kind["attn"], subject, 1), \
                capture(adapter, {"block_in": (adapter.block, "in"), "block_out": (adapter.block, "out"),
                                  "attn": (lambda la: adapter.to_residual("attn", la), "out")}, store):
            logits.append(adapter.model(input_ids=ids).logits[0, tp.last])
        stream = [store["block_in"][0]] + store["block_out"]
        subj_rep.append(stream[read_layer][0, tp.last_subject])
        attn_last.append(torch.stack([a[0, tp.last] for a in store["attn"]]))
    return torch.stack(logits), torch.stack(subj_rep), torch.stack(attn_last)


def default_read_layer(n_layers: int) -> int:
    """Where the attribute rate is read after a knockout: 5/6 of the way up (the paper reads
    layer 40 of GPT-2 XL's 48)."""
    return max(1, round(5 * n_layers / 6))
