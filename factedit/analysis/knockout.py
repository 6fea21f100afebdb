"""Attention knockout (Geva et al. 2023): block edges into the last position.

For each source set (subject tokens, non-subject tokens, the last token itself) and each
centre layer l, the edges last position -> source are blocked in all heads of the layers
``window_layers(l, k, L)`` by adding the dtype's minimum to those attention logits before the
softmax. The measure is the relative change, in %, of the probability of the clean run's
top-1 token (and of a given target token).

The non-subject set leaves out a BOS token at position 0 (one the tokenizer adds, e.g.
Gemma's) unless ``block_bos``: the last position's edge to it is the attention sink, whose
blocking says nothing about the relation (the paper's GPT models have no BOS token).

Row 0 is the clean run, then one row per (source set, centre layer). Knockout changes only
what flows into the last position, so by default every row reruns the last position alone,
from its window's first layer up, on the clean run's keys and values, all rows in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from factedit.analysis.hooks import attention_masks, causal_mask, upcast
from factedit.analysis.rerun import CleanRun, clean_run, prefix_causal_mask, rerun
from factedit.analysis.spans import TokenizedPrompt
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout

SOURCE_SETS = ("subject", "non_subject", "last")


def window_layers(center: int, k: int, n_layers: int) -> range:
    """Layers max(0, l - floor((k-1)/2)) .. min(L-1, l + ceil((k-1)/2))."""
    if k < 1 or k > n_layers:
        raise FactEditError(f"knockout window {k} must lie between 1 and the model's {n_layers} layers")
    lo = max(0, center - (k - 1) // 2)
    hi = min(n_layers - 1, center + math.ceil((k - 1) / 2))
    return range(lo, hi + 1)


def source_positions(tp: TokenizedPrompt, block_bos: bool = False) -> dict[str, list[int]]:
    """The source sets: subject tokens, earlier non-subject tokens (without the tokenizer's
    BOS at position 0 unless ``block_bos``), the last token."""
    s0, s1 = tp.subject_span
    q = tp.last
    skip = {0} if tp.bos and not block_bos else set()
    return {
        "subject": list(range(s0, s1)),
        "non_subject": [i for i in range(q) if not s0 <= i < s1 and i not in skip],
        "last": [q],
    }


def strongest_layer(curve: Sequence[float]) -> int:
    """The centre layer where a knockout hurts most: the index of the most negative relative
    change in ``curve`` (one value per centre layer, (L,); the lowest such layer on ties)."""
    return min(range(len(curve)), key=lambda la: curve[la])


@dataclass
class KnockoutCurves:
    """The knockout curves of one token: the relative change (%) of its probability, per
    centre layer, when the edges last position -> each source set are blocked over ``window``
    layers. ``to_dict`` is the layout circuit.json keeps."""

    window: int
    subject: list[float]  # (L,)
    non_subject: list[float]  # (L,)
    last: list[float]  # (L,)

    def curve(self, source: str) -> list[float]:
        """The curve of a source set (one of ``SOURCE_SETS``)."""
        if source not in SOURCE_SETS:
            raise FactEditError(f"knockout source must be one of {', '.join(SOURCE_SETS)}, not {source!r}")
        return getattr(self, source)

    def strongest(self, source: str) -> int:
        """The centre layer where blocking ``source``'s edges lowers the probability most."""
        return strongest_layer(self.curve(source))

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, **{s: list(self.curve(s)) for s in SOURCE_SETS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KnockoutCurves:
        return cls(d["window"], *(d[s] for s in SOURCE_SETS))


@dataclass
class KnockoutResult:
    prediction: int  # clean top-1 token id
    base_prob: float
    curves: KnockoutCurves  # of p(prediction)
    target: int | None = None
    target_base_prob: float | None = None
    target_curves: KnockoutCurves | None = None  # of p(target), when a target is given

    @property
    def window(self) -> int:
        return self.curves.window


def knockout_rows(n_layers: int) -> list[tuple[str, int]]:
    """One row per (source set, centre layer), in SOURCE_SETS order."""
    return [(s, c) for s in SOURCE_SETS for c in range(n_layers)]


@torch.no_grad()
def attention_knockout(adapter: ModelLayout, tp: TokenizedPrompt, window: int,
                       target: int | None = None, method: str = "fast",
                       clean: CleanRun | None = None, block_bos: bool = False) -> KnockoutResult:
    """The knockout sweep of one fact. ``method="fast"`` reruns only the last position, each
    row from its window's first layer, on the clean run's keys and values (see
    :mod:`factedit.analysis.rerun`); ``"naive"`` is the paper's procedure, one full forward
    pass per intervention, kept as the reference. ``block_bos`` puts a BOS token at position
    0 into the non-subject set."""
    L = adapter.n_layers
    rows = knockout_rows(L)
    blocked = _blocked(tp, window, L, rows, block_bos)
    if method == "fast":
        probs = _fast(adapter, tp, rows, blocked, window, clean)
    elif method == "naive":
        probs = _naive(adapter, tp, rows, blocked)
    else:
        raise FactEditError(f"knockout method must be 'fast' or 'naive', not {method!r}")
    pred = int(probs[0].argmax())

    def curves_for(tok_id: int) -> tuple[float, KnockoutCurves]:
        p0 = float(probs[0, tok_id])
        out: dict[str, list[float]] = {s: [] for s in SOURCE_SETS}
        for r, (s, _c) in enumerate(rows, start=1):
            out[s].append((float(probs[r, tok_id]) - p0) / p0 * 100.0)
        return p0, KnockoutCurves(window, **out)

    p0, curves = curves_for(pred)
    res = KnockoutResult(pred, p0, curves)
    if target is not None:
        res.target = target
        res.target_base_prob, res.target_curves = curves_for(target)
    return res


def _blocked(tp: TokenizedPrompt, window: int, L: int, rows: list[tuple[str, int]],
             block_bos: bool = False) -> list[dict[int, list[int]]]:
    """Per row: layer -> source positions whose edges into the last position are blocked."""
    sources = source_positions(tp, block_bos)
    return [{la: sources[s] for la in window_layers(c, window, L) if sources[s]} for s, c in rows]


def _fast(adapter, tp, rows, blocked, window, clean) -> torch.Tensor:
    L, T, q = adapter.n_layers, len(tp.input_ids), tp.last
    clean = clean or clean_run(adapter, tp.input_ids)
    row_start = [window_layers(c, window, L).start for _s, c in rows]
    device = clean.block_in[0].device

    def masks(layer: int, active: list[int]) -> torch.Tensor:
        m = prefix_causal_mask(len(active), q, T, torch.float32, device, adapter.attn_window(layer))  # (n, 1, 1, T)
        for i, r in enumerate(active):
            if layer in blocked[r]:
                m[i, 0, 0, blocked[r][layer]] = torch.finfo(torch.float32).min
        return m

    out = rerun(adapter, clean, q, row_start, masks=masks)
    logits = torch.cat([clean.logits[None], out.logits])  # (1 + R, V)
    return upcast(logits).softmax(-1)


def _naive(adapter, tp, rows, blocked) -> torch.Tensor:
    T, q = len(tp.input_ids), tp.last
    device = next(adapter.model.parameters()).device
    ids = torch.tensor([tp.input_ids], device=device)
    neg = torch.finfo(torch.float32).min
    logits = [upcast(adapter.model(input_ids=ids).logits[0, q])]
    for r in range(len(rows)):
        def mask(layer, r=r):
            m = causal_mask(1, T, torch.float32, device, adapter.attn_window(layer))
            if layer in blocked[r]:
                m[0, 0, q, blocked[r][layer]] = neg
            return m
        with attention_masks(adapter, mask):
            logits.append(upcast(adapter.model(input_ids=ids).logits[0, q]))
    return torch.stack(logits).softmax(-1)
