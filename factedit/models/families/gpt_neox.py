"""GPT-NeoX / Pythia: fused query_key_value (interleaved per head), parallel residual."""

from factedit.models.adapter import FamilySpec, register


def value_rows(n_heads: int, head_dim: int, head: int) -> range:
    """query_key_value's output is (H, 3*dh) per position, [q, k, v] within each head."""
    start = head * 3 * head_dim + 2 * head_dim
    return range(start, start + head_dim)


SPEC = register(FamilySpec(
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    attn="attention",
    attn_out="attention.dense",
    mlp="mlp",
    mlp_out="mlp.dense_4h_to_h",
    v_proj="attention.query_key_value",
    fused_value_rows=value_rows,
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
))
