"""A model fingerprint: tells two models' weights apart quickly, without hashing every byte.

It hashes the architecture and, for every parameter, its name, shape and a strided sample of
up to 4,096 of its values rounded to bfloat16. A dense weight update, such as a rank-one edit,
changes the sample; loading the same float32 or bfloat16 weights in float32 or bfloat16 does
not, so an adapter made in one precision is recognised in the other.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLE = 4096


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    cfg = model.config
    h.update(f"{cfg.model_type}|{cfg.hidden_size}|{cfg.num_hidden_layers}|{cfg.vocab_size}".encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].to(device="cpu").to(torch.bfloat16).to(torch.float32).contiguous()
        h.update(f"{name}|{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]
