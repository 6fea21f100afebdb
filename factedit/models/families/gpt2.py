"""GPT-2 (and the demo model): Conv1D projections, fused qkv, pre-LN blocks."""

from factedit.models.adapter import FamilySpec, register


def value_rows(n_heads: int, head_dim: int, head: int) -> range:
    """c_attn's output is [q (H*dh) | k (H*dh) | v (H*dh)]: head h's value after both."""
    start = 2 * n_heads * head_dim + head * head_dim
    return range(start, start + head_dim)


SPEC = register(FamilySpec(
    model_types=("gpt2",),
    blocks="transformer.h",
    attn="attn",
    attn_out="attn.c_proj",
    mlp="mlp",
    mlp_out="mlp.c_proj",
    v_proj="attn.c_attn",
    fused_value_rows=value_rows,
    final_norm="transformer.ln_f",
    unembed="lm_head",
    conv1d=True,
    n_heads_attr="n_head",
))
