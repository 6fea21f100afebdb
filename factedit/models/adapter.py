"""Model families as data: where embeddings, blocks, attention, MLP, norms and unembedding live.

Each family file in ``factedit/models/families/`` declares one :class:`FamilySpec`; the
registry picks it from ``config.model_type``. :class:`ModelLayout` binds a spec to a loaded
model and hands out modules and per-head weight slices, so analysis and editing code never
hard-codes module paths. (It is no PEFT adapter: that is the LoRA folder an edit writes.
``ModelAdapter``, its former name, still imports from here, with a ``DeprecationWarning``.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
    mlp_out: str  # MLP output (down) projection, relative to a block
    final_norm: str  # from the model root
    unembed: str  # from the model root
    v_proj: str = ""  # value projection (or fused qkv projection), relative to a block
    # a fused qkv projection's layout, from the family file: (n_heads, head_dim, head) -> the rows
    # of the head's value vector in the projection's output (every head has its own keys and
    # values there). None: a separate value projection, KV head h at rows h*head_dim onwards
    fused_value_rows: Callable[[int, int, int], range] | None = None
    conv1d: bool = False  # GPT-2 Conv1D: weight stored as (in, out)
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str = "num_key_value_heads"  # grouped KV heads, where the config has them
    unembed_pre: str | None = None  # applied between the final norm and the unembedding (OPT project_out)
    # Post-sublayer norms (Gemma 2/3), relative to a block: the residual receives
    # norm(sublayer output) instead of the sublayer output. ``post_norm_gain(norm, a)`` gives the
    # norm's map at input ``a`` (..., d) frozen to a per-position gain (..., d), so that
    # ``norm(a) == a * gain``: what makes per-head outputs add up to what the residual receives.
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    post_norm_gain: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # config attributes: the attention window of sliding layers, and the per-layer types; a
    # layer slides when its type is "sliding_attention", or, where the config has no layer
    # types, whenever the window is set (Mistral)
    window_attr: str = "sliding_window"
    layer_types_attr: str = "layer_types"
    logit_softcap_attr: str | None = None  # config attribute c: logits -> c * tanh(logits / c) (Gemma 2/3)

    def __post_init__(self) -> None:
        if not self.v_proj:
            raise ValueError("FamilySpec.v_proj must name the value (or fused qkv) projection")
        if (self.attn_post_norm or self.mlp_post_norm) and self.post_norm_gain is None:
            raise ValueError("FamilySpec.post_norm_gain must be given with a post-sublayer norm")


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
            f"model family {model_type!r} (model_type in config.json) is not supported: use a model of a "
            f"supported family ({', '.join(types)}), or add a family file in factedit/models/families/"
        )
    return _REGISTRY[model_type]


def context_length(model) -> int | None:
    """The model's context (its position limit), where its config states one."""
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _get_optional(root: nn.Module, path: str) -> nn.Module | None:
    """A submodule that some configs replace by None (e.g. OPT's project_out)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class ModelLayout:
    """A loaded model seen through its family spec: where its blocks, attention, MLP, norms and
    unembedding are, and its per-head weight slices."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.spec = family_for(model.config.model_type)
        self.blocks: nn.ModuleList = _get(model, self.spec.blocks)
        self.n_layers = len(self.blocks)
        self.n_heads = int(getattr(self.config, self.spec.n_heads_attr))
        self.d_model = int(self.config.hidden_size)
        self.head_dim = int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)
        self.n_kv_heads = int(getattr(self.config, self.spec.n_kv_heads_attr, None) or self.n_heads)
        if getattr(self.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"this {model.config.model_type} model attends in both directions (use_bidirectional_attention, "
                "an embedding model): factedit analyses causal language models only"
            )

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

    def v_proj(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.v_proj)

    def post_norm(self, kind: str, layer: int) -> nn.Module | None:
        """The norm applied to sublayer ``kind``'s ("attn" or "mlp") output before the residual
        add, or None where the family has none."""
        rel = self.spec.attn_post_norm if kind == "attn" else self.spec.mlp_post_norm
        return None if rel is None else _get(self.blocks[layer], rel)

    def to_residual(self, kind: str, layer: int) -> nn.Module:
        """The module whose output is exactly what the residual stream receives from sublayer
        ``kind`` ("attn" or "mlp") at ``layer``: its post-norm where the family has one, else
        the sublayer itself (whose first output is then the update)."""
        norm = self.post_norm(kind, layer)
        if norm is not None:
            return norm
        return self.attn(layer) if kind == "attn" else self.mlp(layer)

    def post_gain(self, kind: str, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        """(..., d) the post-norm's gain frozen at the sublayer output ``out`` (..., d), computed
        in float32 or wider: the residual receives ``out * gain``. None without a post-norm."""
        norm = self.post_norm(kind, layer)
        if norm is None:
            return None
        return self.spec.post_norm_gain(norm, out)

    def attn_window(self, layer: int) -> int | None:
        """How many positions (itself included) a query of ``layer`` sees, or None (all earlier
        ones): a key k is visible from query q when q - window < k <= q."""
        window = getattr(self.config, self.spec.window_attr, None)
        types = getattr(self.config, self.spec.layer_types_attr, None)
        if window is None or (types is not None and types[layer] != "sliding_attention"):
            return None
        return int(window)

    def module_name(self, layer: int, rel: str) -> str:
        """Full dotted name, e.g. ``transformer.h.3.mlp.c_proj``."""
        return f"{self.spec.blocks}.{layer}.{rel}"

    @property
    def final_norm(self) -> nn.Module | None:
        """None where the family may leave it out (OPT-350m applies no final norm)."""
        return _get_optional(self.model, self.spec.final_norm)

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

    def head_value_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_V split by head: ((H, d_model, head_dim), bias (H, head_dim) or None), so that head
        h's value at a position with attention input x is ``x @ W[h] + b[h]``. Grouped KV heads
        are expanded: query head h reads KV head ``h // (H / n_kv_heads)``."""
        mod = self.v_proj(layer)
        H, dh, d = self.n_heads, self.head_dim, self.d_model
        n_kv = self.n_value_heads
        rows = torch.tensor([r for kv in range(n_kv) for r in self.value_rows(layer, kv)], device=mod.weight.device)
        w = self.out_weight(mod)[rows]  # (n_kv*dh, d_model): the value rows of the (fused) projection
        b = None if mod.bias is None else mod.bias[rows]
        w = w.view(n_kv, dh, d).transpose(1, 2)  # (n_kv, d, dh)
        b = None if b is None else b.view(n_kv, dh)
        group = H // n_kv
        if group > 1:
            w = w.repeat_interleave(group, 0)
            b = None if b is None else b.repeat_interleave(group, 0)
        return w, b

    def kv_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_value_heads)

    @property
    def n_value_heads(self) -> int:
        """Value vectors per position: every head's in a fused qkv projection, else the KV heads."""
        return self.n_heads if self.spec.fused_value_rows is not None else self.n_kv_heads

    def value_rows(self, layer: int, kv_head: int) -> list[int]:
        """Indices, in the value (or fused qkv) projection's output, of KV head ``kv_head``'s
        value vector."""
        dh = self.head_dim
        if self.spec.fused_value_rows is not None:
            return list(self.spec.fused_value_rows(self.n_heads, dh, kv_head))
        return list(range(kv_head * dh, (kv_head + 1) * dh))

    def head_ov(self, layer: int, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        """Each head's OV map applied to attention inputs ``x`` (..., d_model):
        (..., H, d_model), what head h would write if it attended only to x. With ``gain``
        (d_model,), the frozen post-norm gain of the position it writes to (see
        :meth:`post_gain`), that is what the residual would receive from it."""
        w_v, b_v = self.head_value_weights(layer)  # (H, d, dh)
        v = torch.einsum("...d,hdk->...hk", x.to(w_v.dtype), w_v)
        if b_v is not None:
            v = v + b_v
        out = torch.einsum("...hk,hkd->...hd", v, self.head_out_weights(layer))
        return out if gain is None else out * gain.to(out.dtype)

    # ---- projection to the vocabulary -------------------------------------------------------
    def logit_lens(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """(..., d_model) -> (..., vocab) logits, through the final norm unless told not to, and
        through the family's final logit softcapping where the config sets one (in both cases:
        it belongs to the model's unembedding; it changes probabilities, never ranks)."""
        return self.softcap(self.unembed(self.unembed_input(x, final_norm)))

    def unembed_input(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """(..., d_model): what :meth:`logit_lens` feeds to the unembedding: the final norm
        (unless told not to) and the family's projection before it (OPT's project_out)."""
        if final_norm and self.final_norm is not None:
            x = self.final_norm(x)
        if self.spec.unembed_pre is not None:
            pre = _get_optional(self.model, self.spec.unembed_pre)
            if pre is not None:
                x = pre(x)
        return x

    @property
    def logit_softcap(self) -> float | None:
        """c of the family's final logit softcapping, logits -> c * tanh(logits / c), or None."""
        attr = self.spec.logit_softcap_attr
        return getattr(self.config, attr, None) if attr else None

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The final logit softcapping where the config sets one, as the model's own head does
        (so that projected probabilities match it); logits unchanged otherwise."""
        cap = self.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


def __getattr__(name: str):
    if name == "ModelAdapter":  # the former name, kept for one release
        warnings.warn("factedit.models.adapter.ModelAdapter is deprecated: use ModelLayout (the same class)",
                      DeprecationWarning, stacklevel=2)
        return ModelLayout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
