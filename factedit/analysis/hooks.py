"""Hooks shared by the analyses: per-layer attention masks and activation capture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from factedit.models.adapter import ModelLayout


class Hooks:
    """Forward hooks that are all removed together: ``with Hooks() as hooks: hooks.pre(...)``.
    Registered inside the ``with``, none outlives it, also when registering fails half-way."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre(self, module: torch.nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs (may return new (args, kwargs))."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: torch.nn.Module, fn: Callable) -> None:
        """``fn(module, args, output)`` after ``module`` runs (may return a new output)."""
        self._handles.append(module.register_forward_hook(fn))

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's hidden-state input, passed positionally or as ``hidden_states=``."""
    return args[0] if args else kwargs["hidden_states"]


def first_output(out: Any) -> torch.Tensor:
    """A module's hidden-state output (attention modules return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def with_output(out: Any, new: torch.Tensor) -> Any:
    """``out`` with its hidden-state output replaced by ``new``, in the same structure."""
    return (new, *out[1:]) if isinstance(out, tuple) else new


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(Q, K) bool: which keys at positions ``k_pos`` (K,) a query at ``q_pos`` (Q,) may see:
    those at or before it and, for a sliding-window layer, fewer than ``window`` positions
    back (q - window < k <= q, as transformers' sliding masks)."""
    q, k = q_pos[:, None], k_pos[None, :]
    ok = k <= q
    if window is not None:
        ok = ok & (k > q - window)
    return ok


def causal_mask(batch: int, seq: int, dtype: torch.dtype, device, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where the key is visible (on and below the diagonal, within
    ``window`` positions for a sliding layer), dtype-min elsewhere."""
    pos = torch.arange(seq, device=device)
    m = torch.zeros(seq, seq, dtype=dtype, device=device)
    m[~visible(pos, pos, window)] = torch.finfo(dtype).min
    return m.expand(batch, 1, seq, seq).clone()


@contextmanager
def attention_masks(adapter: ModelLayout, masks: Callable[[int], torch.Tensor | None]) -> Iterator[None]:
    """Replace the ``attention_mask`` each attention module receives by ``masks(layer)``
    (a full additive (B, 1, T, T) mask, causality and the layer's sliding window included,
    see ``ModelLayout.attn_window``), where it is not None."""
    with Hooks() as hooks:
        for layer in range(adapter.n_layers):
            mask = masks(layer)
            if mask is None:
                continue

            def pre(module, args, kwargs, mask=mask):
                p = next(module.parameters())  # the module's device and dtype (device_map may spread layers)
                kwargs["attention_mask"] = mask.to(device=p.device, dtype=p.dtype)
                return args, kwargs

            hooks.pre(adapter.attn(layer), pre)
        yield


def padded_window_mask(attention_mask: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask of a sliding layer for a batch padded on the right
    (``attention_mask`` (B, T), 1 on real tokens): causal within the window, padding keys
    hidden, and every query sees at least itself. The model's own mask leaves a padding query
    more than ``window`` positions after its row's last token with no key at all. Where the
    mask's minimum becomes -inf in the softmax (a float64 model: eager attention takes its
    softmax in float32) that row turns to NaN, and the NaN reaches the real tokens through the
    next layer's values (0 attention weight times NaN)."""
    B, T = attention_mask.shape
    pos = torch.arange(T, device=attention_mask.device)
    ok = visible(pos, pos, window)[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    ok = ok | torch.eye(T, dtype=torch.bool, device=ok.device)[None]
    m = torch.zeros(B, 1, T, T, dtype=dtype, device=attention_mask.device)
    m[~ok[:, None]] = torch.finfo(dtype).min
    return m


def pad_right(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids padded on the right, and the attention mask."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, x in enumerate(seqs):
        ids[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def padding_safe(adapter: ModelLayout, attention_mask: torch.Tensor) -> Iterator[None]:
    """For a right-padded batch: give the sliding-window layers :func:`padded_window_mask`
    (the same as the model's own masks at the real tokens, finite at the padding); the other
    layers keep the model's own masks."""
    windows = {la: w for la in range(adapter.n_layers) if (w := adapter.attn_window(la)) is not None}
    if not windows:
        yield
        return
    masks = {la: padded_window_mask(attention_mask, w, torch.float32) for la, w in windows.items()}
    with attention_masks(adapter, masks.get):
        yield


@contextmanager
def capture(adapter: ModelLayout, what: dict[str, tuple[Callable[[int], torch.nn.Module], str]],
            store: dict[str, list], batch: int = 1) -> Iterator[None]:
    """Record per-layer activations. ``what`` maps a name to (module getter, "in"|"out");
    ``store[name][layer]`` receives the module's first input or its (first) output, as
    (batch, T, d) even where the family flattens tokens (OPT's MLP works on (batch*T, d))."""
    with Hooks() as hooks:
        for name, (getter, kind) in what.items():
            store[name] = [None] * adapter.n_layers
            for layer in range(adapter.n_layers):
                if kind == "in":
                    def keep_in(m, args, kwargs, name=name, layer=layer):
                        store[name][layer] = as_btd(first_input(args, kwargs), batch)
                    hooks.pre(getter(layer), keep_in)
                else:
                    def keep_out(m, args, out, name=name, layer=layer):
                        store[name][layer] = as_btd(first_output(out), batch)
                    hooks.post(getter(layer), keep_out)
        yield


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 to float32 for softmax and ranks; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_btd(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch*T, d) -> (batch, T, d); (batch, T, d) unchanged."""
    return x.view(batch, -1, x.shape[-1]) if x.dim() == 2 else x
