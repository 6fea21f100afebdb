"""The baseline: plain LoRA fine-tuning through peft on the edit prompts.

LoRA (rank ``lora_rank``) on every MLP output projection (or the recipe's ``mlp_layers``),
trained with Adam on the new targets' NLL over the same prompts the targeted edit uses (the
edit prompt after the context prefixes), with no locality term. The trained factors are read
back into a :class:`WeightDelta` and peft's layers are removed again, so the base model is
unchanged.

The requests are cut into chunks whose autograd batch fits ``edit.fit_memory_gib`` (as the
value fit's, :func:`factedit.editing.values.fit_chunk_size`), and each Adam step accumulates
the chunks' gradients: the same loss, the mean over all requests, as one batch would give
(a batch of 48 SmolLM2 requests with 20 prefixes each took more than 23 GiB in one piece).
"""

from __future__ import annotations

import torch

from factedit.analysis.hooks import pad_right, padding_safe
from factedit.editing.config import EditConfig
from factedit.editing.requests import EditRequest
from factedit.editing.stats import Corpus
from factedit.editing.targets import ScoredTargets
from factedit.editing.values import build_rows, context_prefixes, fit_chunk_size
from factedit.editing.weights import WeightDelta
from factedit.models.adapter import ModelLayout


@torch.enable_grad()
def lora_finetune(adapter: ModelLayout, tok, requests: list[EditRequest], corpus: Corpus,
                  cfg: EditConfig) -> tuple[WeightDelta, list[dict]]:
    from peft import LoraConfig, get_peft_model

    model = adapter.model
    layers = cfg.mlp_layers or list(range(adapter.n_layers))
    names = [adapter.module_name(la, adapter.spec.mlp_out) for la in layers]
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    rows = build_rows(tok, requests, prefixes, None)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    size = fit_chunk_size(adapter, max(1, len(prefixes)), cfg)
    chunks = []  # (ids (B, T), mask (B, T), targets grouped by request within the chunk)
    for i0 in range(0, len(requests), size):
        part = [r for r in rows if i0 <= r.req < i0 + size]
        ids, mask = pad_right([r.ids for r in part], pad, device)
        targets = ScoredTargets.build(((b, p, t, r.req - i0) for b, r in enumerate(part) for p, t in r.targets),
                                      min(size, len(requests) - i0), device)
        chunks.append((ids, mask, targets))

    was = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(cfg.seed)
    pcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=names, lora_dropout=0.0,
                      fan_in_fan_out=adapter.spec.conv1d, bias="none")
    peft_model = get_peft_model(model, pcfg)
    delta = WeightDelta(conv1d=adapter.spec.conv1d)
    try:
        params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        opt = torch.optim.Adam(params, lr=cfg.lora_lr)
        def nll(ids: torch.Tensor, mask: torch.Tensor, targets: ScoredTargets) -> torch.Tensor:
            with padding_safe(adapter, mask):
                return targets.mean_nll(peft_model(input_ids=ids, attention_mask=mask).logits)  # (requests,)

        with torch.no_grad():
            before = torch.cat([nll(*c) for c in chunks])
        for _ in range(cfg.lora_steps):
            opt.zero_grad()
            for c in chunks:  # gradients accumulate: the loss is the mean over all requests
                (nll(*c).sum() / len(requests)).backward()
            opt.step()
        with torch.no_grad():
            after = torch.cat([nll(*c) for c in chunks])
        for name in names:
            mod = peft_model.base_model.model.get_submodule(name)
            a = mod.lora_A["default"].weight.detach()
            b = mod.lora_B["default"].weight.detach() * mod.scaling["default"]
            delta.add(name, b, a)
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(was.get(n, False))
    return delta, [{"before": float(x), "after_fit": float(y)} for x, y in zip(before, after)]
