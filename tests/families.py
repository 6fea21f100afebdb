"""Tiny randomly initialised models of every supported family, built from transformers
config classes (no weights are downloaded)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=101, initializer_range=0.3)

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **COMMON),
    "gptj": lambda: tf.GPTJConfig(n_layer=3, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, **COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, **COMMON),
    "llama": lambda: tf.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=64,
                                    max_position_embeddings=64, **COMMON),
    "mistral": lambda: tf.MistralConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64,
                                        max_position_embeddings=64, **COMMON),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=64,
                                    max_position_embeddings=64, **COMMON),
    "gemma": lambda: tf.GemmaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=8, intermediate_size=64,
                                    max_position_embeddings=64, **COMMON),
    "phi": lambda: tf.PhiConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, partial_rotary_factor=0.5,
                                max_position_embeddings=64, **COMMON),
    "opt": lambda: tf.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                                word_embed_proj_dim=32, max_position_embeddings=64, **COMMON),
    # post-sublayer norms, q/k norms, sliding layers whose window (4) is shorter than the test
    # prompts (8 tokens), logit softcapping small enough to matter on these logits
    "gemma3_text": lambda: tf.Gemma3TextConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        intermediate_size=64, max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=3.0, **COMMON),
    # heads * head_dim (64) differs from the width (32), as in the real Gemma models
    "gemma2": lambda: tf.Gemma2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, max_position_embeddings=64, sliding_window=3, query_pre_attn_scalar=16,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        final_logit_softcapping=3.0, attn_logit_softcapping=2.0, **COMMON),
}

FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # norm weights away from their initial 0 (Gemma's 1 + w) or 1
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()
