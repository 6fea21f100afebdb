"""Paraphrase and neighbour prompts for `verify` on a real model, from the request pools' data.

A request whose prompt is one of a pool relation's templates (the places pool's relations,
or a prompt of known_1000's Wikidata relations) gets:

- paraphrases: the relation's other templates filled with the subject (places: two;
  known_1000: up to ``n_paraphrases`` of the relation's other prompts, seeded);
- consequences, for portability (places pool, a city's or a region's country): the
  subject's continent, official language and currency asked through the edited link
  (factedit/studies/portability.py), kept where the model answers them for the true country;
- neighbours, as CounterFact's neighbourhood: other subjects of the same relation whose
  attribute has the true attribute's first token, that the model knows (its top-1 after the
  main prompt is that token), up to ``n_neighbours``, seeded by the subject. Where the model
  knows none of them, the candidates themselves (the source says so).

A prompt that matches no template gets nothing: verify then judges the edit "incomplete"
unless told to allow it.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from factedit.audit.dataset import bundled
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.studies import places
from factedit.studies.pool_base import first_token, mentions, model_known_fn
from factedit.verify.checks import Consequence, Neighbour, PromptSet


@dataclass
class _Relation:
    """One relation's templates (``{}`` = subject) and its facts by attribute."""
    source: str
    templates: list[str]
    name: str = ""  # the places pool's relation name ("" for known_1000)
    by_attribute: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # attribute -> subjects


def _known_1000_relations() -> list[_Relation]:
    records = json.loads(bundled("known_1000").read_text())
    rels: dict[str, _Relation] = {}
    for rec in records:
        rel = rels.setdefault(rec["relation_id"], _Relation(f"known_1000 relation {rec['relation_id']}", []))
        template = rec["prompt"].replace(rec["subject"], "{}", 1)
        if template not in rel.templates:
            rel.templates.append(template)
        if rec["subject"] not in rel.by_attribute[rec["attribute"]]:
            rel.by_attribute[rec["attribute"]].append(rec["subject"])
    return list(rels.values())


def _places_relations() -> list[_Relation]:
    try:
        subjects = places.place_subjects()
    except FactEditError:  # the pools extra is not installed: known_1000 only
        return []
    rels = {r.name: _Relation(f"places pool, {r.name}", list(r.templates), r.name) for r in places.RELATIONS}
    for s in subjects:
        for name, attribute in s.facts:
            rels[name].by_attribute[attribute].append(s.name)
    return list(rels.values())


def pool_prompts(model, tokenizer, n_neighbours: int = 10, n_paraphrases: int = 5,
                 seed: int = 0) -> Callable[[EditRequest, str], PromptSet | None]:
    """A prompt source for :func:`factedit.verify`: ``(request, true attribute) -> PromptSet``
    (None where the request's prompt is no pool relation's template). The pools' data is read
    on the first request that needs it."""
    relations: list[_Relation] = []
    countries: dict[str, dict[str, str]] = {}  # the places pool's country table, read when first needed
    known = model_known_fn(model, tokenizer)

    def source(req: EditRequest, true: str) -> PromptSet | None:
        if not relations:
            relations.extend(_places_relations() + _known_1000_relations())
        template = req.template
        rel = next((r for r in relations if template in r.templates), None)
        if rel is None:
            return None
        rng = random.Random(f"{seed}:{req.subject}")
        others = [t for t in rel.templates if t != template]
        if len(others) > n_paraphrases:
            others = rng.sample(others, n_paraphrases)
        paraphrases = [t.format(req.subject) for t in others]
        neighbours, note = _neighbours(rel, template, req.subject, true, tokenizer, known, rng, n_neighbours)
        consequences = _consequences(rel, req, true, tokenizer, known, countries)
        return PromptSet(paraphrases, neighbours, rel.source + note, consequences)

    return source


def _consequences(rel: _Relation, req: EditRequest, true: str, tok, known,
                  countries: dict[str, dict[str, str]]) -> list[Consequence]:
    """The edit's portability probes that the model answers for the true attribute."""
    from factedit.studies.portability import probes_of

    if rel.name in ("city_country", "region_country") and not countries:
        countries.update(places.country_table())
    probes = probes_of(rel.name, req.subject, true, req.target_new, countries, tok)
    ok = known([p.prompt for p in probes], [p.old for p in probes]) if probes else []
    return [Consequence(p.prompt, p.old, p.new, p.attribute) for p, k in zip(probes, ok) if k]


def _neighbours(rel: _Relation, template: str, subject: str, true: str, tok, known, rng: random.Random,
                n: int) -> tuple[list[Neighbour], str]:
    """Up to ``n`` subjects of ``rel`` sharing the true attribute's first token, the model's
    known ones first; and a note for the source when none is known."""
    want = first_token(tok, true)
    cands = [(s, a) for a, subjects in rel.by_attribute.items() if first_token(tok, a) == want
             for s in subjects if s != subject and not mentions(subject, template.format(s))]
    rng.shuffle(cands)
    cands = cands[: 4 * n]
    if not cands:
        return [], ""
    prompts = [template.format(s) for s, _ in cands]
    ok = known(prompts, [a for _, a in cands])
    chosen = [Neighbour(p, s, a) for p, (s, a), k in zip(prompts, cands, ok) if k][:n]
    if chosen:
        return chosen, ""
    return [Neighbour(p, s, a) for p, (s, a) in zip(prompts[:n], cands[:n])], " (neighbours the model does not know)"
