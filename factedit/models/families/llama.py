"""Llama, Mistral, Qwen2 and Gemma: RMSNorm, gated MLP, grouped KV heads, rotary."""

from factedit.models.adapter import FamilySpec, register

SPEC = register(FamilySpec(
    model_types=("llama", "mistral", "qwen2", "gemma"),
    blocks="model.layers",
    attn="self_attn",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    v_proj="self_attn.v_proj",
    final_norm="model.norm",
    unembed="lm_head",
))
