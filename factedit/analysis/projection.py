"""Vocabulary projection of the residual stream, of each sublayer and of each head.

The clean forward pass (:func:`factedit.analysis.rerun.clean_run`, the same one the knockout
sweeps reuse) records, per layer: the residual stream after the block at every position, the
MHSA and MLP updates of the residual, and the input of the attention output projection,
from which each head's own output at the last position is ``z_h @ W_O[h]`` (the heads'
outputs plus the output bias sum to the MHSA output).

Families with a norm after the attention sublayer (Gemma 2/3) add norm(o_proj(z)) to the
residual. There each head's output is ``(z_h @ W_O[h]) * gain``, with ``gain`` the norm frozen
at the whole sublayer output of that position (``ModelLayout.post_gain``); the heads' outputs
plus the (scaled) bias then sum exactly to what the residual receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factedit.analysis.hooks import upcast
from factedit.analysis.rerun import CleanRun, clean_run
from factedit.models.adapter import ModelLayout


@dataclass
class Components:
    """Activations of one prompt. L layers, H heads, T positions, d model width."""

    embed: torch.Tensor  # (T, d)   residual before block 0
    resid: torch.Tensor  # (L, T, d) residual after each block
    attn: torch.Tensor  # (L, d)    MHSA update of the residual at the last position
    mlp: torch.Tensor  # (L, d)     MLP update of the residual at the last position
    heads: torch.Tensor  # (L, H, d) each head's output at the last position (no bias), post-norm gain applied
    head_bias: torch.Tensor  # (L, d) what the output bias adds there (gain applied; zeros without a bias)
    attn_in: torch.Tensor  # (L, T, d)  each attention module's input (after the block's norm)
    attn_pattern: torch.Tensor | None  # (L, H, T) attention weights of the last position (eager attention)
    logits: torch.Tensor  # (V,)    the model's output logits at the last position
    attn_gain: torch.Tensor | None = None  # (L, d) frozen MHSA post-norm gain at the last position

    def stream(self) -> torch.Tensor:
        """(L+1, T, d): embeddings, then the residual after each block."""
        return torch.cat([self.embed[None], self.resid], 0)


@torch.no_grad()
def components(adapter: ModelLayout, input_ids: list[int], clean: CleanRun | None = None) -> Components:
    """The activations of one prompt, from its clean run (made here unless given)."""
    c = clean or clean_run(adapter, input_ids)
    L = adapter.n_layers
    z = torch.stack([x[-1] for x in c.z]).view(L, adapter.n_heads, adapter.head_dim)  # (L, H, dh)
    w_o = torch.stack([adapter.head_out_weights(i) for i in range(L)])  # (L, H, dh, d)
    heads = torch.einsum("lhk,lhkd->lhd", z.to(w_o.dtype), w_o)
    bias = torch.stack([adapter.attn_out_bias(i) if adapter.attn_out_bias(i) is not None
                        else w_o.new_zeros(w_o.shape[-1]) for i in range(L)])  # (L, d)
    gain = None
    if c.attn_gain is not None:
        gain = torch.stack([g[-1] for g in c.attn_gain])  # (L, d)
        heads = (heads * gain[:, None]).to(w_o.dtype)
        bias = (bias * gain).to(w_o.dtype)
    return Components(
        embed=c.block_in[0],
        resid=torch.stack(c.block_in[1:]),
        attn=torch.stack([x[-1] for x in c.attn]),
        mlp=torch.stack([x[-1] for x in c.mlp]),
        heads=heads,
        head_bias=bias,
        attn_in=torch.stack(c.attn_in),
        attn_pattern=c.attn_pattern,
        logits=c.logits,
        attn_gain=gain,
    )


@torch.no_grad()
def rank_and_prob(adapter: ModelLayout, vecs: torch.Tensor, token: int,
                  final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (1 = top) and probability of ``token`` in the projection of each (..., d) vector."""
    return rank_and_prob_of(upcast(adapter.logit_lens(vecs, final_norm=final_norm)), token)


def rank_and_prob_of(logits: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (1 = top) and probability of ``token`` in projections already made, (..., V)."""
    tgt = logits[..., token : token + 1]
    rank = (logits > tgt).sum(-1, dtype=torch.int32).long() + 1  # an int32 count: half the time of int64's
    prob = logits.softmax(-1)[..., token]
    return rank, prob
