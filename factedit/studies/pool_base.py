"""The parts every request pool shares: relations, facts, the knowledge test, and the builder
of CounterFact-style requests with pairwise-disjoint subjects.

A fact is *known* to a model when its top-1 next token at the end of the relation's main
prompt (the first template, filled with the subject, tokenised as the model's tokenizer does
by default) is the first token of ``" " + attribute`` (known_1000's convention).

The builder (:func:`build_disjoint`) walks the subjects in a seeded order, scoring their main
prompts in chunks (so that a ``limit`` stops the scoring early), and gives each subject one
role: *edited* (one request, on one of its known facts), *held out* (a neighbour: its main
prompts serve as other requests' neighbourhood prompts and it is never edited) or unused. Each
(relation, attribute) group alternates between holding a subject out and editing one until it
holds ``max_neighbours``; after that its subjects are edited. So no request's subject is any
request's neighbour, and every prefix of the list keeps that. A request's new target is an
attribute of the same relation known for an earlier subject in the walk, whose first token
differs from the true attribute's (seeded choice).
"""

from __future__ import annotations

import functools
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from factedit.analysis.rerun import last_logits_only
from factedit.editing.requests import EditRequest

CHUNKS = (16, 32, 64, 128, 256)  # subjects scored per step, then 512 at a time: fixed, so a limit changes nothing


@dataclass(frozen=True)
class Relation:
    name: str
    subject_kind: str
    templates: tuple[str, ...]  # the first is the main prompt, the others its paraphrases; "{}" = subject
    description: str
    editable: bool = True  # False: facts kept as a subject's other facts only (e.g. no two subjects share one)

    def prompt(self, subject: str) -> str:
        return self.templates[0].format(subject)

    def paraphrases(self, subject: str) -> list[str]:
        return [t.format(subject) for t in self.templates[1:]]


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str
    facts: tuple[tuple[str, str], ...]  # (relation name, attribute)


@dataclass
class PoolRequest:
    """One request and the data later metrics need (the request file schema: docs/pools.md)."""

    request: EditRequest
    pool: str
    relation: str
    subject_kind: str
    other_facts: list[dict[str, str]] = field(default_factory=list)  # {relation, prompt, attribute}
    hard_neighbours: list[dict[str, str]] = field(default_factory=list)  # {subject, prompt, attribute, shares}

    def to_record(self) -> dict[str, Any]:
        r = self.request
        rec: dict[str, Any] = {"case_id": r.case_id, "pool": self.pool, "relation": self.relation,
                               "subject_kind": self.subject_kind, "prompt": r.prompt, "subject": r.subject,
                               "target_new": r.target_new, "target_true": r.target_true,
                               "paraphrase_prompts": r.paraphrase_prompts,
                               "neighborhood_prompts": r.neighborhood_prompts,
                               "other_facts": self.other_facts, "hard_neighbours": self.hard_neighbours}
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> PoolRequest:
        r = EditRequest(rec["prompt"], rec["subject"], rec["target_new"], rec.get("target_true"),
                        list(rec.get("paraphrase_prompts", [])), list(rec.get("neighborhood_prompts", [])),
                        rec.get("case_id"))
        return cls(r, rec.get("pool", ""), rec.get("relation", ""), rec.get("subject_kind", ""),
                   list(rec.get("other_facts", [])), list(rec.get("hard_neighbours", [])))


@dataclass
class BuildStats:
    """What a walk saw: per relation, facts scanned and known; subjects by role."""

    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    known: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    edited: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_attribute: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # relation -> attr -> [facts, known]
    subjects_scanned: int = 0
    subjects_known: int = 0
    held_out: int = 0
    complete: bool = False  # every subject was scanned (no limit cut the walk short)

    def to_dict(self) -> dict[str, Any]:
        return {"total": dict(self.total), "known": dict(self.known), "edited": dict(self.edited),
                "by_attribute": self.by_attribute,
                "subjects_scanned": self.subjects_scanned, "subjects_known": self.subjects_known,
                "held_out": self.held_out, "complete": self.complete}


KnownFn = Callable[[list[str], list[str]], list[bool]]  # (prompts, attributes) -> known per prompt
FirstTokenFn = Callable[[str], int]


def mentions(subject: str, text: str) -> bool:
    """Whether ``subject`` occurs in ``text`` as a whole word ("Ada" is not in "Adam"): then a
    prompt about another subject still asks about this one, and is no neighbour of it."""
    before = r"(?<!\w)" if subject[:1].isalnum() else ""
    after = r"(?!\w)" if subject[-1:].isalnum() else ""
    return re.search(before + re.escape(subject) + after, text) is not None


def first_token(tok, text: str) -> int:
    """The first token id of ``" " + text`` without special tokens (Gemma's tokenizer adds BOS)."""
    return tok(" " + text.strip(), add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def top1_tokens(model, tok, prompts: Sequence[str], batch: int = 64) -> list[int]:
    """The top-1 next token after each prompt. Prompts of the same token length run together
    (no padding), only the last position's logits are computed where the model allows it."""
    device = next(model.parameters()).device
    ids = [tok(p)["input_ids"] for p in prompts]  # each (T_i,)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(ids):
        by_len[len(row)].append(i)
    keep = last_logits_only(model)
    top: dict[int, int] = {}
    for idx in by_len.values():
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            logits = model(input_ids=torch.tensor([ids[i] for i in chunk], device=device), **keep).logits  # (b, t, V)
            top.update(zip(chunk, logits[:, -1].argmax(-1).tolist()))
    return [top[i] for i in range(len(prompts))]


def model_known_fn(model, tok, batch: int = 64) -> KnownFn:
    """The knowledge test on a model: top-1 next token = first token of the attribute."""

    def known(prompts: list[str], attributes: list[str]) -> list[bool]:
        tops = top1_tokens(model, tok, prompts, batch)
        return [t == first_token(tok, a) for t, a in zip(tops, attributes)]

    return known


def _chunks(items: Sequence[Subject]) -> Iterator[Sequence[Subject]]:
    start, sizes = 0, list(CHUNKS)
    while start < len(items):
        size = sizes.pop(0) if sizes else 512
        yield items[start : start + size]
        start += size


def _scored(subjects: Sequence[Subject], relations: dict[str, Relation], known: KnownFn,
            memo: dict[str, bool]) -> Iterator[tuple[Subject, list[tuple[str, str]]]]:
    """Each subject (in order) with its known facts, scoring a chunk's unseen prompts at a time;
    ``memo`` (prompt -> known) is read and filled."""
    for chunk in _chunks(subjects):
        todo = {relations[r].prompt(s.name): a for s in chunk for r, a in s.facts}
        todo = {p: a for p, a in todo.items() if p not in memo}
        if todo:
            memo.update(zip(todo, known(list(todo), list(todo.values()))))
        for s in chunk:
            yield s, [(r, a) for r, a in s.facts if memo[relations[r].prompt(s.name)]]


@dataclass
class _Walk:
    """The builder's state while it walks the subjects."""

    held: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))  # group -> subjects
    edits: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    attributes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # relation -> known so far


def build_disjoint(pool: str, subjects: Sequence[Subject], relations: Sequence[Relation], known: KnownFn,
                   first: FirstTokenFn, seed: int = 0, limit: int | None = None, max_neighbours: int = 10,
                   memo: dict[str, bool] | None = None,
                   log: Callable[[str], None] = lambda m: None) -> tuple[list[PoolRequest], BuildStats]:
    """Requests with pairwise-disjoint subjects, none of them another's neighbour (module
    docstring); up to ``limit``. ``memo`` (prompt -> known) spares scoring known prompts again;
    ``log`` hears the progress every 1,024 subjects."""
    rels = {r.name: r for r in relations}
    first = functools.lru_cache(maxsize=None)(first)  # one tokenizer call per attribute
    order = list(subjects)
    rng = random.Random(seed)
    rng.shuffle(order)
    memo = {} if memo is None else memo
    walk, stats, out = _Walk(), BuildStats(), []
    for s, facts in _scored(order, rels, known, memo):
        stats.subjects_scanned += 1
        for r, a in s.facts:
            stats.total[r] += 1
            stats.by_attribute.setdefault(r, {}).setdefault(a, [0, 0])[0] += 1
        for r, a in facts:
            stats.known[r] += 1
            stats.by_attribute[r][a][1] += 1
        stats.subjects_known += bool(facts)
        role, req = _place(pool, s, facts, rels, walk, first, rng, max_neighbours, len(out))
        stats.held_out += role == "held"
        if req is not None:
            out.append(req)
            stats.edited[req.relation] += 1
        for r, a in facts:
            if a not in walk.attributes[r]:
                walk.attributes[r].append(a)
        if limit is not None and len(out) >= limit:
            return out, stats
        if stats.subjects_scanned % 1024 == 0:
            log(f"{pool}: {stats.subjects_scanned} of {len(order)} subjects, {stats.subjects_known} known, "
                f"{len(out)} requests")
    stats.complete = True
    return out, stats


def _place(pool: str, s: Subject, facts: list[tuple[str, str]], rels: dict[str, Relation], walk: _Walk,
           first: FirstTokenFn, rng: random.Random, max_nb: int, case_id: int) -> tuple[str, PoolRequest | None]:
    """Hold ``s`` out ("held"), edit one of its known facts ("edited", with the request) or
    leave it ("unused")."""
    groups = [(r, a) for r, a in facts if rels[r].editable]
    if not groups:
        return "unused", None
    if any(len(walk.held[g]) < max_nb and len(walk.held[g]) <= walk.edits[g] for g in groups):
        _hold(s, groups, walk, max_nb)
        return "held", None
    options = []
    for r, a in groups:
        news = [b for b in walk.attributes[r] if first(b) != first(a)]
        if news and any(not mentions(s.name, rels[r].prompt(n)) for n in walk.held[(r, a)]):
            options.append((r, a, news))
    if not options:
        if any(len(walk.held[g]) < max_nb for g in groups):
            _hold(s, groups, walk, max_nb)
            return "held", None
        return "unused", None
    r, a, news = rng.choice(options)
    new = rng.choice(news)
    walk.edits[(r, a)] += 1
    rel = rels[r]
    hard = [{"subject": n, "prompt": rel.prompt(n), "attribute": b, "shares": which}
            for b, which in ((a, "target_true"), (new, "target_new")) for n in walk.held.get((r, b), [])
            if not mentions(s.name, rel.prompt(n))]
    others = [{"relation": q, "prompt": rels[q].prompt(s.name), "attribute": b} for q, b in facts if q != r]
    neighbours = [h["prompt"] for h in hard if h["shares"] == "target_true"]
    req = EditRequest(rel.templates[0], s.name, new, a, paraphrase_prompts=rel.paraphrases(s.name),
                      neighborhood_prompts=neighbours, case_id=case_id)
    return "edited", PoolRequest(req, pool, r, rel.subject_kind, others, hard)


def _hold(s: Subject, groups: list[tuple[str, str]], walk: _Walk, max_nb: int) -> None:
    for g in groups:
        if len(walk.held[g]) < max_nb:
            walk.held[g].append(s.name)
