"""Recall of the world's facts: top-1 next token = the attribute's first token."""

from __future__ import annotations

from collections import defaultdict

import torch

from factedit.world.generate import World


@torch.no_grad()
def top1_tokens(model, tok, prompts: list[str], batch_size: int = 256) -> list[int]:
    """Greedy next-token id for each prompt. Prompts of equal token length are batched
    together, so no padding (and no position-id subtlety) is involved."""
    enc = [tok.encode(p) for p in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(enc):
        by_len[len(ids)].append(i)
    device = next(model.parameters()).device
    out = [0] * len(prompts)
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            ids = torch.tensor([enc[i] for i in chunk], device=device)
            pred = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
            for i, p in zip(chunk, pred):
                out[i] = p
    return out


def evaluate_recall(model, tok, world: World, max_entities: int | None = None) -> dict:
    """Recall on training templates (all entities) and on held-out templates
    (``paraphrase_test`` entities only, which never saw them)."""
    ents = world.entities if max_entities is None else world.entities[:max_entities]
    result = {}
    for split, heldout, pool in (("train_templates", False, ents),
                                 ("heldout_templates", True, [e for e in ents if e.paraphrase_test])):
        prompts, targets = [], []
        for e in pool:
            for _, prompt, attr in world.prompts(e, heldout=heldout):
                prompts.append(prompt)
                targets.append(tok.encode(" " + attr)[0])
        preds = top1_tokens(model, tok, prompts)
        hits = sum(p == t for p, t in zip(preds, targets))
        result[f"recall_{split}"] = round(hits / max(1, len(prompts)), 5)
        result[f"n_{split}"] = len(prompts)
    return result
