"""Partial reruns: many interventions at the cost of the states they actually change.

An intervention that first acts at layer ``l`` on positions ``>= p`` leaves every state below
layer ``l`` and every position before ``p`` exactly as in the clean run. Attention knockout
into the last position (p = last) and sublayer knockout at the subject (p = first subject
token) are both of that kind. So one clean pass is kept (:class:`CleanRun`: each block's input
and the keys and values it cached) and every intervention is rerun only for positions
``p..T-1`` and only from its first layer up, reusing the clean keys and values of positions
``< p``. All rows run as one batch; at layer ``l`` the block computes only the rows whose
intervention has begun, and the other rows carry the clean states.

Rows are "active" at layer l when ``row_start[row] <= l``. Callers build per-layer masks and
sublayer interventions for the active rows only (see :func:`active_rows`).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from factedit.analysis.hooks import Hooks, as_btd, attention_masks, first_input, first_output, visible
from factedit.models.adapter import ModelLayout


@dataclass
class CleanRun:
    """One clean forward pass. L layers, T positions, d model width, V vocabulary.

    ``attn`` and ``mlp`` are what the residual stream receives from each sublayer: the output
    of the family's post-norm where it has one (Gemma 2/3), else the sublayer's own output."""

    input_ids: list[int]
    block_in: list[torch.Tensor]  # L+1 x (T, d): input of block l; [L] = the last block's output
    keys: list[torch.Tensor]  # L x (1, kv_heads, T, head_dim), every position (no sliding-window cut)
    values: list[torch.Tensor]  # L x (1, kv_heads, T, head_dim)
    attn: list[torch.Tensor]  # L x (T, d) MHSA update of the residual
    logits: torch.Tensor  # (V,) output logits at the last position
    mlp: list[torch.Tensor]  # L x (T, d) MLP update of the residual
    z: list[torch.Tensor]  # L x (T, H*head_dim) input of the attention output projection
    attn_in: list[torch.Tensor]  # L x (T, d) input of each attention module (after the block's norm)
    attn_pattern: torch.Tensor | None  # (L, H, T) attention weights of the last position (eager attention)
    attn_gain: list[torch.Tensor] | None = None  # L x (T, d) MHSA post-norm gain, frozen (None: no post-norm)


def layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]  # legacy tuple of (k, v)


def new_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A cache holding ``kv`` with every position in every layer. Made without the model's
    config on purpose: a config with sliding-window layers would make the cache keep only
    the last window of those layers, and the reruns need all the clean keys and values."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


def with_cache(model, cache) -> dict:
    """The forward's keyword for a KV cache (``cache`` in newer transformers models,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out):
    """The cache a forward returned (``cache`` or ``past_key_values``, by version)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def last_logits_only(model) -> dict:
    """Ask for the last position's logits only, where the model's forward supports it."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def clean_run(adapter: ModelLayout, input_ids: list[int]) -> CleanRun:
    """One clean forward pass, keeping each block's input, the keys and values, and what the
    vocabulary projections need (sublayer updates of the residual, the heads' inputs to the
    output projection and the frozen post-norm gains, the attention modules' inputs and the
    last position's attention weights)."""
    return clean_runs(adapter, [input_ids])[0]


# Logits are taken at the last LOGIT_ROWS positions of every prompt (the last one kept), so that
# the unembedding's matrix product has at least 4 rows whatever the batch size: BLAS takes
# another path below that, and a prompt's logits would then depend on its batch.
LOGIT_ROWS = 4


@torch.no_grad()
def clean_runs(adapter: ModelLayout, prompts: list[list[int]]) -> list[CleanRun]:
    """:func:`clean_run` of many prompts, those of the same length in one batch (so no padding:
    each row's numbers are the ones its own pass gives, up to float32 rounding: bit for bit where
    the CPU's kernels do not choose their summation order by batch shape; tested to 1e-5)."""
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    out: list = [None] * len(prompts)
    for idx in by_len.values():
        for i, run in zip(idx, _clean_batch(adapter, [prompts[i] for i in idx]), strict=True):
            out[i] = run
    return out


def _clean_batch(adapter: ModelLayout, prompts: list[list[int]]) -> list[CleanRun]:
    """The clean runs of prompts of one length, in one forward pass of (B, T)."""
    L, B = adapter.n_layers, len(prompts)
    device = next(adapter.model.parameters()).device
    block_in: list = [None] * (L + 1)  # (B, T, d) each
    got: dict[str, list] = {k: [None] * L for k in ("attn", "mlp", "z", "attn_in", "pattern", "gain")}

    def keep_in(layer):
        def hook(m, args, kwargs):
            block_in[layer] = first_input(args, kwargs)
        return hook

    def keep_last_out(m, args, out):
        block_in[L] = first_output(out)

    def keep_out(name, layer):
        def hook(m, args, out):
            got[name][layer] = as_btd(first_output(out), B)
        return hook

    def keep_pattern(layer):
        def hook(m, args, out):
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            got["pattern"][layer] = w[:, :, -1] if isinstance(w, torch.Tensor) and w.dim() == 4 else None
        return hook

    def keep_input(name, layer):
        def hook(m, args, kwargs):
            got[name][layer] = as_btd(first_input(args, kwargs), B)
        return hook

    def keep_gain(layer):
        def hook(m, args, kwargs):
            a = as_btd(first_input(args, kwargs), B)  # (B, T, d)
            got["gain"][layer] = adapter.post_gain("attn", layer, a)
        return hook

    model = adapter.model
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": min(LOGIT_ROWS, len(prompts[0]))} if "logits_to_keep" in params else {}
    with Hooks() as hooks:
        for la in range(L):
            hooks.pre(adapter.block(la), keep_in(la))
            hooks.post(adapter.to_residual("attn", la), keep_out("attn", la))
            hooks.post(adapter.attn(la), keep_pattern(la))
            hooks.post(adapter.to_residual("mlp", la), keep_out("mlp", la))
            hooks.pre(adapter.attn_out(la), keep_input("z", la))
            hooks.pre(adapter.attn(la), keep_input("attn_in", la))
            if adapter.post_norm("attn", la) is not None:
                hooks.pre(adapter.post_norm("attn", la), keep_gain(la))
        hooks.post(adapter.block(L - 1), keep_last_out)
        out = model(input_ids=torch.tensor(prompts, device=device), use_cache=True,
                    **with_cache(model, new_cache([])), **keep)
    kv = [layer_kv(output_cache(out), la) for la in range(L)]  # (B, kv_heads, T, head_dim) each
    patterns = got["pattern"]
    has_pattern = all(p is not None for p in patterns)
    has_gain = all(g is not None for g in got["gain"])
    runs = []
    for b, ids in enumerate(prompts):
        def row(xs, b=b):
            return [x[b] for x in xs]

        runs.append(CleanRun(
            list(ids), row(block_in), [k[b : b + 1] for k, _ in kv], [v[b : b + 1] for _, v in kv], row(got["attn"]),
            out.logits[b, -1], mlp=row(got["mlp"]), z=row(got["z"]), attn_in=row(got["attn_in"]),
            attn_pattern=torch.stack(row(patterns)) if has_pattern else None,
            attn_gain=row(got["gain"]) if has_gain else None))
    return runs


def active_rows(row_start: list[int], layer: int) -> list[int]:
    """The rows whose intervention has begun by ``layer``, in row order."""
    return [r for r, s in enumerate(row_start) if s <= layer]


def prefix_causal_mask(n_rows: int, start: int, seq: int, dtype: torch.dtype, device,
                       window: int | None = None) -> torch.Tensor:
    """(n_rows, 1, seq - start, seq) additive mask for queries ``start..seq-1`` over keys
    ``0..seq-1``: 0 where the key is visible (at or before the query, and within ``window``
    positions for a sliding layer), dtype-min elsewhere."""
    q = torch.arange(start, seq, device=device)
    k = torch.arange(seq, device=device)
    m = torch.zeros(seq - start, seq, dtype=dtype, device=device)
    m[~visible(q, k, window)] = torch.finfo(dtype).min
    return m.expand(n_rows, 1, seq - start, seq).clone()


@dataclass
class Rerun:
    """What a partial rerun returns. B rows, n = T - start recomputed positions."""

    logits: torch.Tensor  # (B, V) at the last position
    stream: dict[tuple[int, int], torch.Tensor]  # (stream layer, position) -> (B, d); 0 = embeddings
    attn_last: torch.Tensor | None  # (B, L, d) MHSA update of the residual at the last position


@contextmanager
def _rows_only(adapter: ModelLayout, clean: CleanRun, row_start: list[int], start: int) -> Iterator[None]:
    """Make block l compute only its active rows; the other rows get the clean block output."""
    B = len(row_start)
    patched = []
    for layer in range(adapter.n_layers):
        block = adapter.block(layer)
        rows = active_rows(row_start, layer)
        idx = torch.tensor(rows, dtype=torch.long, device=clean.block_in[0].device)
        original, n_active = block.forward, len(rows)

        def forward(self, *args, _orig=original, _idx=idx, _n=n_active, _layer=layer, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            out = clean.block_in[_layer + 1][start:].expand(B, -1, -1).clone()  # (B, n, d)
            result = None
            if _n:
                idx = _idx.to(h.device)
                result = _orig(h[idx], *args[1:], **kwargs)
                out = out.to(h.device)
                out[idx] = result[0] if isinstance(result, tuple) else result
            if isinstance(result, tuple):
                return (out, *[None] * (len(result) - 1))
            return out

        # a forward already set on the instance (accelerate's device_map hooks) is put back after
        patched.append((block, block.__dict__.get("forward")))
        block.forward = types.MethodType(forward, block)
    try:
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


@torch.no_grad()
def rerun(adapter: ModelLayout, clean: CleanRun, start: int, row_start: list[int],
          masks: Callable[[int, list[int]], torch.Tensor] | None = None,
          hooks: Callable[[int, list[int]], list] | None = None,
          keep_stream: list[tuple[int, int]] = (), keep_attn_last: bool = False) -> Rerun:
    """Rerun ``len(row_start)`` rows on positions ``start..T-1``, row r from layer
    ``row_start[r]`` up.

    ``masks(layer, rows)`` gives the additive attention mask of the active ``rows`` at that
    layer, (len(rows), 1, n, T), causality and the layer's sliding window included (default:
    plain causal within the window).
    ``hooks(layer, rows)`` gives context managers to enter for the rerun (e.g. sublayer
    interventions), which see tensors of the active rows only, in that order.
    ``keep_stream`` names the (stream layer, position) pairs to return for every row.
    """
    L = adapter.n_layers
    T = len(clean.input_ids)
    B = len(row_start)
    device = clean.block_in[0].device
    active = [active_rows(row_start, la) for la in range(L)]
    mask_by_layer = []
    for la in range(L):
        if masks is not None:
            mask_by_layer.append(masks(la, active[la]))
        else:
            mask_by_layer.append(prefix_causal_mask(len(active[la]), start, T, torch.float32, device,
                                                    adapter.attn_window(la)))

    prefix = [(k[..., :start, :].expand(len(active[la]), -1, -1, -1),
               v[..., :start, :].expand(len(active[la]), -1, -1, -1))
              for la, (k, v) in enumerate(zip(clean.keys, clean.values))]
    cache = new_cache(prefix) if start > 0 else None

    kept: dict[int, torch.Tensor] = {}  # stream layer -> (B, n, d)
    attn_sub: list = [None] * L
    wanted = {s for s, _ in keep_stream}

    def keep(m, args, out, la):
        kept[la + 1] = first_output(out)

    def keep_attn(m, args, out, la):
        attn_sub[la] = as_btd(first_output(out), len(active[la]))[:, -1]

    ids = torch.tensor([clean.input_ids[start:]] * B, device=device)
    pos = torch.arange(start, T, device=device)[None]
    with Hooks() as own, ExitStack() as stack:
        for la in range(L):
            if la + 1 in wanted:
                own.post(adapter.block(la), partial(keep, la=la))
            if keep_attn_last and active[la]:
                own.post(adapter.to_residual("attn", la), partial(keep_attn, la=la))
        stack.enter_context(_rows_only(adapter, clean, row_start, start))
        stack.enter_context(attention_masks(adapter, lambda la: mask_by_layer[la]))
        if hooks is not None:
            for la in range(L):
                for cm in hooks(la, active[la]):
                    stack.enter_context(cm)
        logits = adapter.model(input_ids=ids, position_ids=pos, use_cache=cache is not None,
                               **with_cache(adapter.model, cache), **last_logits_only(adapter.model)).logits[:, -1]

    stream = {}
    for s, p in keep_stream:
        if p < start:
            stream[(s, p)] = clean.block_in[s][p].expand(B, -1)
        elif s == 0:
            stream[(s, p)] = clean.block_in[0][p].expand(B, -1)  # embeddings never change
        else:
            stream[(s, p)] = kept[s][:, p - start].to(device)
    attn_last = None
    if keep_attn_last:
        attn_last = torch.stack([clean.attn[la][-1].to(device).expand(B, -1) for la in range(L)], 1).clone()  # (B,L,d)
        for la in range(L):
            if active[la]:
                attn_last[active[la], la] = attn_sub[la].to(attn_last.device)
    return Rerun(logits=logits, stream=stream, attn_last=attn_last)
