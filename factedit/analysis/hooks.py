"""Hooks shared by the analyses: per-layer attention masks and activation capture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from factedit.models.adapter import ModelAdapter


def causal_mask(batch: int, seq: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 on and below the diagonal, dtype-min above."""
    m = torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return m.expand(batch, 1, seq, seq).clone()


@contextmanager
def attention_masks(adapter: ModelAdapter, masks: Callable[[int], torch.Tensor | None]) -> Iterator[None]:
    """Replace the ``attention_mask`` each attention module receives by ``masks(layer)``
    (a full additive (B, 1, T, T) mask, causality included), where it is not None."""
    handles = []
    for layer in range(adapter.n_layers):
        mask = masks(layer)
        if mask is None:
            continue

        def pre(module, args, kwargs, mask=mask):
            p = next(module.parameters())  # the module's device and dtype (device_map may spread layers)
            kwargs["attention_mask"] = mask.to(device=p.device, dtype=p.dtype)
            return args, kwargs

        handles.append(adapter.attn(layer).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(adapter: ModelAdapter, what: dict[str, tuple[Callable[[int], torch.nn.Module], str]],
            store: dict[str, list], batch: int = 1) -> Iterator[None]:
    """Record per-layer activations. ``what`` maps a name to (module getter, "in"|"out");
    ``store[name][layer]`` receives the module's first input or its (first) output, as
    (batch, T, d) even where the family flattens tokens (OPT's MLP works on (batch*T, d))."""
    handles = []
    for name, (getter, kind) in what.items():
        store[name] = [None] * adapter.n_layers
        for layer in range(adapter.n_layers):
            mod = getter(layer)
            if kind == "in":
                def hook(m, args, kwargs, name=name, layer=layer):
                    x = args[0] if args else kwargs["hidden_states"]
                    store[name][layer] = as_btd(x, batch)
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                def hook(m, args, out, name=name, layer=layer):
                    store[name][layer] = as_btd(out[0] if isinstance(out, tuple) else out, batch)
                handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 to float32 for softmax and ranks; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_btd(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch*T, d) -> (batch, T, d); (batch, T, d) unchanged."""
    return x.view(batch, -1, x.shape[-1]) if x.dim() == 2 else x
