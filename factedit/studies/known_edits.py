"""CounterFact-style edit requests built from the known facts of a real model, and their scores.

Built the way CounterFact was, from ROME's known_1000 (bundled):
- a request rewrites a fact the model knows (its top-1 token is the attribute's first token);
- target_new: the attribute of another known fact of the same relation whose first token differs;
- paraphrase prompts: the relation's other known_1000 templates, filled with the subject;
- neighbourhood prompts: other known subjects of the same relation with the same attribute
  (their own prompts), up to 10.

Scores, CounterFact's probability comparison (mean per-token NLL under teacher forcing):
ES (edit prompt: new beats true), PS (paraphrases), NS (neighbours: true still beats new),
S their harmonic mean; plus top-1 efficacy (the new attribute's first token is the argmax).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from factedit.audit.dataset import bundled
from factedit.editing.requests import EditRequest
from factedit.verify.metrics import compare, score


@dataclass
class KnownFact:
    prompt: str
    template: str
    subject: str
    attribute: str
    relation: str


def first_token(tok, text: str) -> int:
    return tok(" " + text.strip(), add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def known_facts(model, tok, limit: int | None = None) -> list[KnownFact]:
    """The known_1000 facts whose attribute the model predicts first, in file order."""
    out = []
    device = next(model.parameters()).device
    for rec in json.loads(bundled("known_1000").read_text()):
        ids = torch.tensor([tok(rec["prompt"])["input_ids"]], device=device)
        if int(model(input_ids=ids).logits[0, -1].argmax()) == first_token(tok, rec["attribute"]):
            out.append(KnownFact(rec["prompt"], rec["template"], rec["subject"], rec["attribute"],
                                 rec["relation_id"]))
            if limit is not None and len(out) >= limit:
                break
    return out


def build_requests(facts: list[KnownFact], tok, n: int, seed: int = 0, max_neighbours: int = 10
                   ) -> list[EditRequest]:
    """Up to ``n`` requests (see the module docstring); facts without a paraphrase template or a
    neighbour are skipped, as CounterFact has both for every record."""
    rng = random.Random(seed)
    templates: dict[str, set[str]] = defaultdict(set)
    by_rel: dict[str, list[KnownFact]] = defaultdict(list)
    for f in facts:
        templates[f.relation].add(f.template)
        by_rel[f.relation].append(f)
    order = list(range(len(facts)))
    rng.shuffle(order)
    out: list[EditRequest] = []
    seen: set[tuple[str, str]] = set()
    for i in order:
        f = facts[i]
        if (f.subject, f.relation) in seen:
            continue
        paraphrases = sorted(t.format(f.subject) for t in templates[f.relation] if t != f.template)
        neighbours = [g.prompt for g in by_rel[f.relation] if g.attribute == f.attribute and g.subject != f.subject]
        others = sorted({g.attribute for g in by_rel[f.relation]
                         if first_token(tok, g.attribute) != first_token(tok, f.attribute)})
        if not paraphrases or not neighbours or not others:
            continue
        seen.add((f.subject, f.relation))
        out.append(EditRequest(f.template, f.subject, rng.choice(others), f.attribute,
                               paraphrase_prompts=paraphrases,
                               neighborhood_prompts=sorted(set(neighbours))[:max_neighbours],
                               case_id=len(out)))
        if len(out) >= n:
            break
    return out


def score_requests(model, tok, requests: list[EditRequest]) -> dict[str, float]:
    """ES, PS, NS, S and top-1 efficacy, in %, of the model as it is now (apply the edit first)."""
    es, ps, ns, top1 = [], [], [], []
    for r in requests:
        c = compare(model, tok, [r.filled_prompt], r.target_new, r.target_true)
        es.append(score(c)[0])
        top1.append(_first_is_argmax(model, tok, r))
        ps.append(score(compare(model, tok, r.paraphrase_prompts, r.target_new, r.target_true))[0])
        ns.append(score(compare(model, tok, r.neighborhood_prompts, r.target_new, r.target_true), reverse=True)[0])
    m = {k: 100 * sum(v) / len(v) for k, v in (("ES", es), ("PS", ps), ("NS", ns), ("top1", top1))}
    m["S"] = 3 / sum(1 / max(m[k], 1e-9) for k in ("ES", "PS", "NS"))
    return m


@torch.no_grad()
def _first_is_argmax(model, tok, r: EditRequest) -> bool:
    ids = torch.tensor([tok(r.filled_prompt)["input_ids"]], device=next(model.parameters()).device)
    return int(model(input_ids=ids).logits[0, -1].argmax()) == first_token(tok, r.target_new)
