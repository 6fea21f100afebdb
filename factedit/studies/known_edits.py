"""CounterFact-style edit requests built from the known facts of a real model, and their scores.

Built the way CounterFact was, from ROME's known_1000 (bundled):
- a request rewrites a fact the model knows (its top-1 token is the attribute's first token);
- target_new: the attribute of another known fact of the same relation whose first token differs;
- paraphrase prompts: the relation's other known_1000 templates, filled with the subject;
- neighbourhood prompts: other known subjects of the same relation with the same attribute
  (their own prompts), up to 10; for edits applied together (``disjoint=True``), only subjects
  that no request edits.

Scores, CounterFact's probability comparison (mean per-token NLL under teacher forcing):
ES (edit prompt: new beats true), PS (paraphrases), NS (neighbours: true still beats new),
S their harmonic mean; plus top-1 efficacy (the new attribute's first token is the argmax),
fluency (ROME's n-gram entropy of a greedy 40-token generation from the edit prompt) and, where
known_1000 holds other known facts of the edited subject, SF: the share of them whose attribute
is still the top-1 prediction.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from factedit.audit.dataset import bundled
from factedit.editing.requests import EditRequest
from factedit.verify.metrics import compare, generate, ngram_entropy, score


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
def known_facts(model, tok, limit: int | None = None, batch: int = 64) -> list[KnownFact]:
    """The known_1000 facts whose attribute the model predicts first, in file order. Prompts of
    the same token length run together (no padding, so each row is its own unbatched pass)."""
    records = json.loads(bundled("known_1000").read_text())
    device = next(model.parameters()).device
    ids = [tok(rec["prompt"])["input_ids"] for rec in records]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(ids):
        by_len[len(row)].append(i)
    top: dict[int, int] = {}
    for idx in by_len.values():
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            logits = model(input_ids=torch.tensor([ids[i] for i in chunk], device=device)).logits  # (b, T, V)
            top.update(zip(chunk, logits[:, -1].argmax(-1).tolist()))
    out = []
    for i, rec in enumerate(records):
        if top[i] == first_token(tok, rec["attribute"]):
            out.append(KnownFact(rec["prompt"], rec["template"], rec["subject"], rec["attribute"],
                                 rec["relation_id"]))
            if limit is not None and len(out) >= limit:
                break
    return out


def build_requests(facts: list[KnownFact], tok, n: int, seed: int = 0, max_neighbours: int = 10,
                   disjoint: bool = False) -> list[EditRequest]:
    """Up to ``n`` requests (see the module docstring); facts without a paraphrase template or a
    neighbour are skipped, as CounterFact has both for every record.

    ``disjoint=True`` builds requests that are applied together (a batch, a sequence): no
    request's subject is another request's neighbour, else NS would score a neighbour that the
    batch itself rewrote (on SmolLM2's 108 requests, every neighbour prompt is another request's
    subject). Walking the facts in the seed's order, each (relation, attribute) group alternates:
    a fact is held out as a neighbour while its group holds no more neighbours than edits, and
    is edited otherwise, against the group's held-out facts so far. A subject held out (or
    edited) in one relation is neither edited (nor held out) in another. Every prefix of the
    list keeps this property."""
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
    held: dict[tuple[str, str], list[KnownFact]] = defaultdict(list)  # (relation, attribute) -> held out
    edits: dict[tuple[str, str], int] = defaultdict(int)
    held_subjects: set[str] = set()
    edited_subjects: set[str] = set()
    for i in order:
        f = facts[i]
        if (f.subject, f.relation) in seen:
            continue
        paraphrases = sorted(t.format(f.subject) for t in templates[f.relation] if t != f.template)
        others = sorted({g.attribute for g in by_rel[f.relation]
                         if first_token(tok, g.attribute) != first_token(tok, f.attribute)})
        if disjoint:
            group = (f.relation, f.attribute)
            if f.subject in held_subjects:
                continue
            if len(held[group]) <= edits[group] and f.subject not in edited_subjects:
                if any(g.subject != f.subject for g in by_rel[f.relation] if g.attribute == f.attribute):
                    held[group].append(f)  # a neighbour for the group's later edits
                    held_subjects.add(f.subject)
                continue
            neighbours = [g.prompt for g in held[group]]
        else:
            neighbours = [g.prompt for g in by_rel[f.relation] if g.attribute == f.attribute and g.subject != f.subject]
        if not paraphrases or not neighbours or not others:
            if disjoint and f.subject not in edited_subjects and neighbours:
                held[(f.relation, f.attribute)].append(f)  # cannot be a request: still a neighbour
                held_subjects.add(f.subject)
            continue
        seen.add((f.subject, f.relation))
        edits[(f.relation, f.attribute)] += 1
        edited_subjects.add(f.subject)
        out.append(EditRequest(f.template, f.subject, rng.choice(others), f.attribute,
                               paraphrase_prompts=paraphrases,
                               neighborhood_prompts=sorted(set(neighbours))[:max_neighbours],
                               case_id=len(out)))
        if len(out) >= n:
            break
    return out


def subject_facts(facts: list[KnownFact], requests: list[EditRequest]) -> dict[int | str | None, list[KnownFact]]:
    """Per request (by case id): the other known facts of its subject (other relations)."""
    out: dict[int | str | None, list[KnownFact]] = {}
    for r in requests:
        rel = next(f.relation for f in facts if f.subject == r.subject and f.template == r.prompt)
        out[r.case_id] = [f for f in facts if f.subject == r.subject and f.relation != rel]
    return out


def score_requests(model, tok, requests: list[EditRequest], *, fluency: bool = False,
                   others: dict[int | str | None, list[KnownFact]] | None = None) -> dict[str, float]:
    """ES, PS, NS, S and top-1 efficacy, in %, of the model as it is now (apply the edit first);
    with ``fluency``, the mean generation entropy ("fluency", bits); with ``others`` (see
    :func:`subject_facts`), SF in % over ``n_SF`` facts (None where there are none), ``k_SF`` of them kept."""
    es, ps, ns, top1, flu, sf = [], [], [], [], [], []
    for r in requests:
        c = compare(model, tok, [r.filled_prompt], r.target_new, r.target_true)
        es.append(score(c)[0])
        top1.append(_first_is(model, tok, r.filled_prompt, r.target_new))
        ps.append(score(compare(model, tok, r.paraphrase_prompts, r.target_new, r.target_true))[0])
        ns.append(score(compare(model, tok, r.neighborhood_prompts, r.target_new, r.target_true), reverse=True)[0])
        if fluency:
            flu.append(ngram_entropy(generate(model, tok, [r.filled_prompt])[0]))
        sf += [_first_is(model, tok, f.prompt, f.attribute) for f in (others or {}).get(r.case_id, [])]
    m: dict[str, float] = {k: 100 * sum(v) / len(v) for k, v in (("ES", es), ("PS", ps), ("NS", ns),
                                                                 ("top1", top1))}
    m["S"] = harmonic_s(m)
    if fluency:
        m["fluency"] = sum(flu) / len(flu)
    if others is not None:
        m["SF"] = 100 * sum(sf) / len(sf) if sf else None
        m["n_SF"] = len(sf)
        m["k_SF"] = sum(sf)
    return m


def harmonic_s(m: dict[str, float]) -> float:
    """CounterFact's S: the harmonic mean of ES, PS and NS."""
    return 3 / sum(1 / max(m[k], 1e-9) for k in ("ES", "PS", "NS"))


@torch.no_grad()
def _first_is(model, tok, prompt: str, target: str) -> bool:
    ids = torch.tensor([tok(prompt)["input_ids"]], device=next(model.parameters()).device)
    return int(model(input_ids=ids).logits[0, -1].argmax()) == first_token(tok, target)
