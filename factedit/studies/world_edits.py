"""Edit quality on a synthetic world, where every fact and template is known.

Each edit rewrites one (entity, relation) fact to another attribute of the same relation,
asked with the relation's first training template. Scores (top-1 accuracy, the
world's attributes being single tokens):

- efficacy: the new attribute on all of the relation's training templates;
- paraphrase: the new attribute on the held-out template (the entities are drawn from the
  ``paraphrase_test`` ones, which never saw it in training, and the edit never sees it);
- neighbourhood: 10 other entities, same relation, unchanged;
- other relations: the same entity's other facts unchanged.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from factedit.editing.config import EditConfig
from factedit.editing.edit import compute_edit
from factedit.editing.requests import EditRequest
from factedit.editing.stats import Corpus
from factedit.editing.weights import applied
from factedit.world.evaluate import top1_tokens
from factedit.world.generate import Entity, World


@dataclass
class WorldEdit:
    entity: Entity
    relation: str
    request: EditRequest


def sample_world_edits(world: World, n: int, seed: int = 0) -> list[WorldEdit]:
    """``n`` distinct (entity, relation) facts of ``paraphrase_test`` entities, each to another
    attribute of the relation."""
    rng = random.Random(seed)
    pool = [(e, r) for e in world.entities if e.paraphrase_test for r in world.relations]
    out = []
    for e, rid in rng.sample(pool, n):
        rel = world.relations[rid]
        new = rng.choice([a for a in rel.attributes if a != e.facts[rid]])
        out.append(WorldEdit(e, rid, EditRequest(rel.templates[0], e.name, new, e.facts[rid])))
    return out


def score_world_edits(model, tok, world: World, edits: list[WorldEdit], seed: int = 0) -> dict[str, float]:
    """Scores of the model as it is now (apply the edit first)."""
    rng = random.Random(seed + 1)
    edited = {(w.entity.name, w.relation) for w in edits}
    prompts: list[str] = []
    labels: list[tuple[str, str]] = []
    for w in edits:
        rel = world.relations[w.relation]
        name, new = w.entity.name, w.request.target_new
        for t in rel.templates:
            prompts.append(t.format(name))
            labels.append(("efficacy", new))
        for t in rel.heldout_templates:
            prompts.append(t.format(name))
            labels.append(("paraphrase", new))
        others = [e for e in world.entities if (e.name, w.relation) not in edited]
        for o in rng.sample(others, min(10, len(others))):
            prompts.append(rel.templates[1].format(o.name))
            labels.append(("neighbourhood", o.facts[w.relation]))
        for rid in world.relations:
            if (name, rid) not in edited:
                prompts.append(world.relations[rid].templates[0].format(name))
                labels.append(("other_relations", w.entity.facts[rid]))
    got = [tok.decode([i]).strip() for i in top1_tokens(model, tok, prompts)]
    hits: dict[str, list[int]] = {}
    for (kind, want), g in zip(labels, got):
        hits.setdefault(kind, []).append(int(g == want))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def run_world_edits(model, tok, world: World, corpus: Corpus, edits: list[WorldEdit], cfg: EditConfig,
                    mode: str) -> dict:
    """Edit (one at a time for ``single``, all at once otherwise) and score."""
    t0 = time.perf_counter()
    if mode == "single":
        scores: dict[str, float] = {}
        for w in edits:
            res = compute_edit([w.request], model, tok, corpus, cfg=cfg, progress=False)
            with applied(model, res.delta):
                for k, v in score_world_edits(model, tok, world, [w]).items():
                    scores[k] = scores.get(k, 0.0) + v / len(edits)
        seconds = time.perf_counter() - t0
    else:
        res = compute_edit([w.request for w in edits], model, tok, corpus, cfg=cfg, mode=mode, progress=False)
        seconds = time.perf_counter() - t0
        with applied(model, res.delta):
            scores = score_world_edits(model, tok, world, edits)
    return {"n": len(edits), "mode": mode, "method": cfg.method, "seconds": round(seconds, 2), **scores}
