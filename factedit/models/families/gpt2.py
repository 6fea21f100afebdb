"""GPT-2 (and the demo model): Conv1D projections, fused qkv, pre-LN blocks."""

from factedit.models.adapter import FamilySpec, register

SPEC = register(FamilySpec(
    model_types=("gpt2",),
    blocks="transformer.h",
    attn="attn",
    attn_out="attn.c_proj",
    mlp="mlp",
    mlp_out="mlp.c_proj",
    v_proj="attn.c_attn",
    qkv="gpt2_fused",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    conv1d=True,
    n_heads_attr="n_head",
))
