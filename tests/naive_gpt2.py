"""An independent, naive GPT-2 forward pass written from the equations (nanoGPT style),
with optional blocked attention edges and sublayer removal. Used as the reference that
factedit's hook-based analyses must match."""

from __future__ import annotations

import math

import torch


def forward(model, ids: list[int], blocked: dict[int, list[int]] | None = None,
            record: dict | None = None, removed: dict[str, set[int]] | None = None,
            removed_at: list[int] = ()) -> torch.Tensor:
    """Logits (T, V) of one prompt. ``blocked[layer]`` lists source positions whose edges
    into the last position are removed (softmax over the remaining ones).
    ``removed["mlp"|"attn"]`` lists layers whose sublayer output is not added to the residual
    at the positions ``removed_at``."""
    removed = removed or {}
    tr = model.transformer
    T = len(ids)
    idx = torch.tensor(ids)
    x = tr.wte(idx) + tr.wpe(torch.arange(T))  # (T, d)
    H = model.config.n_head
    d = x.shape[-1]
    dh = d // H
    if record is not None:
        record["embed"] = x
    for layer, blk in enumerate(tr.h):
        h = blk.ln_1(x)
        qkv = h @ blk.attn.c_attn.weight + blk.attn.c_attn.bias  # Conv1D: (in, out)
        q, k, v = qkv.split(d, dim=-1)
        q, k, v = (t.view(T, H, dh).transpose(0, 1) for t in (q, k, v))  # (H, T, dh)
        att = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (H, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        if blocked and layer in blocked:
            allowed[T - 1, blocked[layer]] = False
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        z = (att @ v).transpose(0, 1).reshape(T, d)  # (T, H*dh)
        attn_out = z @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        keep = torch.ones(T, 1, dtype=x.dtype)
        keep[list(removed_at)] = 0
        x = x + (attn_out * keep if layer in removed.get("attn", ()) else attn_out)
        mlp_out = blk.mlp.c_proj(blk.mlp.act(blk.mlp.c_fc(blk.ln_2(x))))
        x = x + (mlp_out * keep if layer in removed.get("mlp", ()) else mlp_out)
        if record is not None:
            record.setdefault("ln_1", []).append(h)
            record.setdefault("z", []).append(z[-1])
            record.setdefault("attn", []).append(attn_out[-1])
            record.setdefault("mlp", []).append(mlp_out[-1])
            record.setdefault("resid", []).append(x)
    return model.lm_head(tr.ln_f(x))
