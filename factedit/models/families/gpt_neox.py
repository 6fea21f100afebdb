"""GPT-NeoX / Pythia: fused query_key_value (interleaved per head), parallel residual."""

from factedit.models.adapter import FamilySpec, register

SPEC = register(FamilySpec(
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    attn="attention",
    attn_out="attention.dense",
    mlp="mlp",
    mlp_out="mlp.dense_4h_to_h",
    v_proj="attention.query_key_value",
    qkv="neox_fused",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
))
