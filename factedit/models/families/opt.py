"""OPT: no MLP module (fc1/fc2 sit in the decoder layer), learned positions."""

from factedit.models.adapter import FamilySpec, register

SPEC = register(FamilySpec(
    model_types=("opt",),
    blocks="model.decoder.layers",
    attn="self_attn",
    attn_out="self_attn.out_proj",
    mlp="fc2",
    mlp_out="fc2",
    v_proj="self_attn.v_proj",
    unembed_pre="model.decoder.project_out",
    final_norm="model.decoder.final_layer_norm",
    unembed="lm_head",
))
