"""Model families as data: where embeddings, blocks, attention, MLP, norms and unembedding live.

Each family file in ``factedit/models/families/`` declares one :class:`FamilySpec`; the
registry picks it from ``config.model_type``. :class:`ModelAdapter` binds a spec to a loaded
model and hands out modules and per-head weight slices, so analysis and editing code never
hard-codes module paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from factedit.errors import FactEditError


class UnsupportedModelError(FactEditError):
    pass


@dataclass(frozen=True)
class FamilySpec:
    model_types: tuple[str, ...]
    blocks: str  # ModuleList of transformer blocks, from the model root
    attn: str  # attention module, relative to a block (its forward gets `attention_mask`)
    attn_out: str  # attention output projection, relative to a block
    mlp: str  # MLP module, relative to a block
    mlp_in: str  # MLP input (up) projection, relative to a block
    mlp_out: str  # MLP output (down) projection, relative to a block
    final_norm: str  # from the model root
    unembed: str  # from the model root
    conv1d: bool = False  # GPT-2 Conv1D: weight stored as (in, out)
    n_heads_attr: str = "num_attention_heads"


_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    for t in spec.model_types:
        _REGISTRY[t] = spec
    return spec


def supported_model_types() -> list[str]:
    from factedit.models import families  # noqa: F401  (registers the family files)

    return sorted(_REGISTRY)


def family_for(model_type: str) -> FamilySpec:
    types = supported_model_types()
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported; supported families: {', '.join(types)}"
        )
    return _REGISTRY[model_type]


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


class ModelAdapter:
    """A loaded model seen through its family spec."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.spec = family_for(model.config.model_type)
        self.blocks: nn.ModuleList = _get(model, self.spec.blocks)
        self.n_layers = len(self.blocks)
        self.n_heads = int(getattr(self.config, self.spec.n_heads_attr))
        self.d_model = int(self.config.hidden_size)
        self.head_dim = int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    # ---- modules ------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def attn(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.attn)

    def attn_out(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.attn_out)

    def mlp(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.mlp)

    def mlp_out(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.mlp_out)

    def module_name(self, layer: int, rel: str) -> str:
        """Full dotted name, e.g. ``transformer.h.3.mlp.c_proj``."""
        return f"{self.spec.blocks}.{layer}.{rel}"

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return _get(self.model, self.spec.unembed)

    # ---- weights --------------------------------------------------------------------------
    def out_weight(self, module: nn.Module) -> torch.Tensor:
        """A projection's weight as (out, in), whatever its storage layout."""
        return module.weight.T if self.spec.conv1d else module.weight

    def head_out_weights(self, layer: int) -> torch.Tensor:
        """W_O split by head: (H, head_dim, d_model), so head h writes z_h @ W[h]."""
        w = self.out_weight(self.attn_out(layer))  # (d_model, H*head_dim)
        return w.T.reshape(self.n_heads, self.head_dim, -1)

    def attn_out_bias(self, layer: int) -> torch.Tensor | None:
        return self.attn_out(layer).bias

    # ---- projection to the vocabulary -------------------------------------------------------
    def logit_lens(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """(..., d_model) -> (..., vocab) logits, through the final norm unless told not to."""
        if final_norm:
            x = self.final_norm(x)
        return self.unembed(x)
