"""The constrained fine-tuning baseline, FT-L (Zhu et al. 2020, as ROME's paper ran it).

The full weight of the MLP output projection at ``mlp_layers`` (the recipe's traced layer,
ROME's site; every layer if unset) is trained with Adam (``ft_lr``, ``ft_steps``) on the new
target's NLL after the bare edit prompt (no context prefixes, no locality term). After each
step the change is clipped elementwise to ±``ft_norm_constraint`` (the L∞ constraint). The
change is dense; it is stored as the factors (I, ΔW), so it exports as a full-rank LoRA and
merges exactly.
"""

from __future__ import annotations

import torch

from factedit.analysis.hooks import pad_right, padding_safe
from factedit.editing.config import EditConfig
from factedit.editing.requests import EditRequest
from factedit.editing.targets import ScoredTargets
from factedit.editing.values import build_rows
from factedit.editing.weights import WeightDelta
from factedit.models.adapter import ModelLayout


@torch.enable_grad()
def ft_l(adapter: ModelLayout, tok, requests: list[EditRequest], cfg: EditConfig) -> tuple[WeightDelta, list[dict]]:
    model = adapter.model
    layers = cfg.mlp_layers or list(range(adapter.n_layers))
    names = [adapter.module_name(la, adapter.spec.mlp_out) for la in layers]
    rows = build_rows(tok, requests, [""], None)  # the bare prompt only
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = pad_right([r.ids for r in rows], pad, device)  # (B, T)
    targets = ScoredTargets.build(((b, p, t, r.req) for b, r in enumerate(rows) for p, t in r.targets),
                                  len(requests), device)
    weights = [model.get_submodule(n).weight for n in names]
    saved = [w.detach().clone() for w in weights]
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)

    def nll() -> torch.Tensor:
        with padding_safe(adapter, mask):
            return targets.mean_nll(model(input_ids=ids, attention_mask=mask).logits)  # (n,)

    delta = WeightDelta(conv1d=adapter.spec.conv1d)
    try:
        opt = torch.optim.Adam(weights, lr=cfg.ft_lr)
        with torch.no_grad():
            before = nll()
        for _ in range(cfg.ft_steps):
            loss = nll().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # the L-infinity constraint on the change
                for w, w0 in zip(weights, saved):
                    w.copy_(w0 + (w - w0).clamp(-cfg.ft_norm_constraint, cfg.ft_norm_constraint))
        with torch.no_grad():
            after = nll()
        for name, w, w0 in zip(names, weights, saved):
            d = (w.detach() - w0).float()  # (out, in), or (in, out) for Conv1D
            d = d.T if adapter.spec.conv1d else d
            delta.add(name, torch.eye(d.shape[0]), d)
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
        for n, p in model.named_parameters():
            p.requires_grad_(was.get(n, False))
    return delta, [{"before": float(x), "after_fit": float(y)} for x, y in zip(before, after)]
