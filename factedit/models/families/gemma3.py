"""Gemma 3 (text, e.g. Gemma-3-270M) and Gemma 2: a Llama-like layout plus norms after each
sublayer, q/k norms, sliding-window layers, embeddings scaled by sqrt(d), a BOS token and
(Gemma 2) logit softcapping.

A Gemma block is

    h = x + post_attention_layernorm(o_proj(z))          z: the heads' outputs, concatenated
    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

so the residual receives norm(sum of heads), not the sum of heads. factedit defines the
per-head outputs with the norm's scale frozen at the whole sublayer output: for the output
a = o_proj(z) at one position, the norm is the diagonal map

    norm(a) = a * gain(a),   gain(a) = rsqrt(mean(a^2) + eps) * (1 + w)

and head h's output there is (z_h @ W_O[h]) * gain(a). The heads' outputs then add up
exactly to what the residual receives from MHSA. The knockout and the sublayer knockout act
on (and read) the post-norm output, the OV check scales by the gain of the last position in
the clean run, and the value edits are fitted through the model itself. The MLP's output
is read after its post-norm likewise; MEMIT's spread turns a wanted residual change into the
MLP output whose normed value is the reachable one nearest the wanted residual (see
factedit.editing.insert.through_rms_norm: the norm's gain is 0 or near 0 in some dimensions
of Gemma-3-270M, where dividing by it asks for unbounded changes).

The attention modules' query/key norms act inside attention and need nothing here; the
sliding windows come from the config's ``sliding_window`` and ``layer_types`` (the adapter's
defaults), and the final logit softcapping from ``final_logit_softcapping``.
"""

from __future__ import annotations

import torch
from torch import nn

from factedit.models.adapter import FamilySpec, register


def rms_gain(norm: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm frozen at its input ``a`` (..., d): ``rsqrt(mean(a^2) + eps) * (1 + w)``,
    computed in float32 (as the model does) or float64 for a float64 input."""
    dt = torch.promote_types(a.dtype, torch.float32)
    a = a.to(dt)
    scale = torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + norm.eps)  # (..., 1)
    return scale * (1.0 + norm.weight.to(dt))  # (..., d)


SPEC = register(FamilySpec(
    model_types=("gemma3_text", "gemma2"),
    blocks="model.layers",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    v_proj="self_attn.v_proj",
    final_norm="model.norm",
    unembed="lm_head",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    post_norm_gain=rms_gain,
    logit_softcap_attr="final_logit_softcapping",
))
