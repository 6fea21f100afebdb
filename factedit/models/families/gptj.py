"""GPT-J: parallel attention and MLP from one LayerNorm, separate q/k/v, rotary."""

from factedit.models.adapter import FamilySpec, register

SPEC = register(FamilySpec(
    model_types=("gptj",),
    blocks="transformer.h",
    attn="attn",
    attn_out="attn.out_proj",
    mlp="mlp",
    mlp_out="mlp.fc_out",
    v_proj="attn.v_proj",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    n_heads_attr="n_head",
))
