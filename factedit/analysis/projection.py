"""Vocabulary projection of the residual stream, of each sublayer and of each head.

One clean forward pass records, per layer: the residual stream after the block at every
position, the MHSA and MLP outputs at the last position, and the input of the attention
output projection at the last position, from which each head's own output is
``z_h @ W_O[h]`` (the heads' outputs plus the output bias sum to the MHSA output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factedit.analysis.hooks import capture, upcast
from factedit.models.adapter import ModelAdapter


@dataclass
class Components:
    """Activations of one prompt. L layers, H heads, T positions, d model width."""

    embed: torch.Tensor  # (T, d)   residual before block 0
    resid: torch.Tensor  # (L, T, d) residual after each block
    attn: torch.Tensor  # (L, d)    MHSA output at the last position
    mlp: torch.Tensor  # (L, d)     MLP output at the last position
    heads: torch.Tensor  # (L, H, d) each head's output at the last position (no bias)
    attn_in: torch.Tensor  # (L, T, d)  each attention module's input (after the block's norm)
    attn_pattern: torch.Tensor | None  # (L, H, T) attention weights of the last position (eager attention)
    logits: torch.Tensor  # (V,)    the model's output logits at the last position

    def stream(self) -> torch.Tensor:
        """(L+1, T, d): embeddings, then the residual after each block."""
        return torch.cat([self.embed[None], self.resid], 0)


@torch.no_grad()
def components(adapter: ModelAdapter, input_ids: list[int]) -> Components:
    device = next(adapter.model.parameters()).device
    store: dict[str, list] = {}
    what = {
        "block_in": (adapter.block, "in"),
        "block_out": (adapter.block, "out"),
        "attn": (adapter.attn, "out"),
        "mlp": (adapter.mlp, "out"),
        "z": (adapter.attn_out, "in"),
        "attn_in": (adapter.attn, "in"),
    }
    ids = torch.tensor([input_ids], device=device)
    patterns: list = [None] * adapter.n_layers

    def keep_pattern(layer):
        def hook(m, a, out):
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            patterns[layer] = w[0, :, -1] if isinstance(w, torch.Tensor) and w.dim() == 4 else None
        return hook

    handles = [adapter.attn(la).register_forward_hook(keep_pattern(la)) for la in range(adapter.n_layers)]
    try:
        with capture(adapter, what, store):
            logits = adapter.model(input_ids=ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    resid = torch.stack([x[0] for x in store["block_out"]])  # (L, T, d)
    z = torch.stack([x[0, -1] for x in store["z"]])  # (L, H*dh)
    L = adapter.n_layers
    z = z.view(L, adapter.n_heads, adapter.head_dim)
    w_o = torch.stack([adapter.head_out_weights(i) for i in range(L)])  # (L, H, dh, d)
    heads = torch.einsum("lhk,lhkd->lhd", z.to(w_o.dtype), w_o)
    return Components(
        embed=store["block_in"][0][0],
        resid=resid,
        attn=torch.stack([x[0, -1] for x in store["attn"]]),
        mlp=torch.stack([x[0, -1] for x in store["mlp"]]),
        heads=heads,
        attn_in=torch.stack([x[0] for x in store["attn_in"]]),
        attn_pattern=torch.stack(patterns) if all(p is not None for p in patterns) else None,
        logits=logits,
    )


@torch.no_grad()
def rank_and_prob(adapter: ModelAdapter, vecs: torch.Tensor, token: int,
                  final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (1 = top) and probability of ``token`` in the projection of each (..., d) vector."""
    logits = upcast(adapter.logit_lens(vecs, final_norm=final_norm))  # (..., V)
    tgt = logits[..., token : token + 1]
    rank = (logits > tgt).sum(-1) + 1
    prob = logits.softmax(-1)[..., token]
    return rank, prob
