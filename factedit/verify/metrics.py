"""Edit metrics, in CounterFact's definitions (ROME), plus EasyEdit-style accuracies.

Scores compare the new target (o*) with the true one (o^c) by their mean per-token negative
log-likelihood under teacher forcing (multi-token targets included), batched:

- efficacy score (ES): share of edit prompts where NLL(o*) < NLL(o^c); magnitude (EM): mean of
  p(o*) - p(o^c), with p = exp(-mean per-token NLL) (the per-token geometric-mean probability);
- paraphrase score/magnitude (PS/PM): the same on paraphrase prompts;
- neighbourhood score/magnitude (NS/NM): the reverse (o^c should still beat o*) on other
  subjects' prompts;
- fluency: n-gram entropy of greedy generations, (2/3 H2 + 4/3 H3) / 2 (ROME's weights);

and the accuracy-style variants, labelled as such:

- reliability: token accuracy (teacher-forced argmax) of o* on the edit prompts;
- generalisation: the same on paraphrases;
- locality: share of neighbourhood prompts whose teacher-forced argmax tokens along o^c are
  the same as the base model's.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from factedit.analysis.hooks import padding_safe
from factedit.analysis.spans import target_token_ids
from factedit.editing.targets import ScoredTargets
from factedit.models.adapter import ModelLayout


@torch.no_grad()
def teacher_forced(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64,
                   ) -> tuple[list[float], list[list[int]], list[list[int]]]:
    """Per (prompt, target): mean per-token NLL, the target's token ids, and the model's argmax
    at each target position. Right-padded batches with an attention mask."""
    device = next(model.parameters()).device
    adapter = ModelLayout(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll: list[float] = []
    tgt_ids: list[list[int]] = []
    argmax: list[list[int]] = []
    items = []
    for p, t in zip(prompts, targets):
        pid = tokenizer(p)["input_ids"]
        tid = target_token_ids(tokenizer, p, t)
        items.append((pid, tid))
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        T = max(len(p) + len(t) - 1 for p, t in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (p, t) in enumerate(chunk):
            seq = p + t[:-1]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        with padding_safe(adapter, mask.to(device)):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        # target token j of prompt b is predicted at position len(p) - 1 + j
        targets = ScoredTargets.build(((b, len(p) - 1 + j, tj, b) for b, (p, t) in enumerate(chunk)
                                       for j, tj in enumerate(t)), len(chunk), device)
        nll += targets.mean_nll(logits).tolist()
        top = logits[targets.row, targets.pos].argmax(-1).tolist()  # (K,)
        for _p, t in chunk:
            tgt_ids.append(list(t))
            argmax.append(top[: len(t)])
            top = top[len(t):]
    return nll, tgt_ids, argmax


def compare(model, tokenizer, prompts: list[str], new: str, true: str | None) -> dict:
    """NLLs of the new and true targets after each prompt, and the accuracy of the new one."""
    if not prompts:
        return {}
    n_new, t_new, a_new = teacher_forced(model, tokenizer, prompts, [new] * len(prompts))
    out = {"nll_new": n_new,
           "accuracy_new": [sum(x == y for x, y in zip(t, a)) / len(t) for t, a in zip(t_new, a_new)]}
    if true is not None:
        n_true, _, a_true = teacher_forced(model, tokenizer, prompts, [true] * len(prompts))
        out["nll_true"] = n_true
        out["argmax_true"] = a_true
    return out


def score(c: dict, reverse: bool = False) -> tuple[float, float] | tuple[None, None]:
    """(score, magnitude) from :func:`compare`; ``reverse`` for neighbourhood prompts."""
    if not c or "nll_true" not in c:
        return None, None
    wins, mags = [], []
    for nn, nt in zip(c["nll_new"], c["nll_true"]):
        a, b = (nt, nn) if reverse else (nn, nt)
        wins.append(a < b)
        mags.append(math.exp(-a) - math.exp(-b))
    return sum(wins) / len(wins), sum(mags) / len(mags)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]], device=device)
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(g[0, ids.shape[1]:]))
    return out


def ngram_entropy(text: str) -> float:
    """ROME's fluency measure of one text: (2/3 H(bigrams) + 4/3 H(trigrams)) / 2, in bits."""
    words = text.split()
    hs = []
    for n in (2, 3):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        hs.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return (2 / 3 * hs[0] + 4 / 3 * hs[1]) / 2
