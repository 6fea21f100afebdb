"""Phi (1, 1.5, 2): parallel attention and MLP, output projection named `dense`."""

from factedit.models.adapter import FamilySpec, register

SPEC = register(FamilySpec(
    model_types=("phi",),
    blocks="model.layers",
    attn="self_attn",
    attn_out="self_attn.dense",
    mlp="mlp",
    mlp_out="mlp.fc2",
    v_proj="self_attn.v_proj",
    final_norm="model.final_layernorm",
    unembed="lm_head",
))
