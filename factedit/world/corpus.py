"""Training text for the demo world.

Three kinds of example, mixed in every step (weights in the recipe):

* ``query``: a template prompt followed by the attribute, loss on the attribute only;
  sometimes preceded by an unrelated sentence about another entity, so that recall works
  with context in front of the subject (ROME-style editing averages over such prefixes).
* ``bio``: every fact of one entity as sentences in a shuffled order, loss on all tokens.
* ``index``: the name directly followed by all its attributes in a shuffled order,
  loss on all tokens. The token right after the name is then any of the entity's
  attributes, so the last subject token must carry all of them (subject enrichment).

Entities marked ``paraphrase_test`` never see their relation's held-out templates.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from factedit.world.generate import Entity, World


def training_templates(world: World, entity: Entity, rid: str) -> list[str]:
    rel = world.relations[rid]
    return rel.templates if entity.paraphrase_test else rel.templates + rel.heldout_templates


def sentence(template: str, entity: Entity, rid: str) -> str:
    return f"{template.format(entity.name)} {entity.facts[rid]}."


def query_example(world: World, entity: Entity, rng: random.Random,
                  prefix_prob: float = 0.3) -> tuple[str, str]:
    """(context ending right before the attribute, ' attribute')."""
    rid = rng.choice(list(world.relations))
    prompt = rng.choice(training_templates(world, entity, rid)).format(entity.name)
    if rng.random() < prefix_prob:
        other = rng.choice(world.entities)
        orid = rng.choice(list(world.relations))
        prompt = sentence(rng.choice(training_templates(world, other, orid)), other, orid) + " " + prompt
    return prompt, " " + entity.facts[rid]


def bio_text(world: World, entity: Entity, rng: random.Random) -> str:
    rids = list(world.relations)
    rng.shuffle(rids)
    return " ".join(sentence(rng.choice(training_templates(world, entity, r)), entity, r)
                    for r in rids)


def index_text(world: World, entity: Entity, rng: random.Random) -> str:
    attrs = [entity.facts[r] for r in world.relations]
    rng.shuffle(attrs)
    return f"{entity.name} " + ", ".join(attrs) + "."


def tokenizer_corpus(world: World, seed: int = 0) -> Iterator[str]:
    """Text for training the BPE tokenizer.

    Attributes and template words are repeated often so that they become whole tokens;
    each name appears once, so names split into several sub-word tokens as in real models.
    """
    rng = random.Random(seed)
    for rel in world.relations.values():
        for _ in range(50):
            for a in rel.attributes:
                yield f"{rng.choice(rel.templates + rel.heldout_templates).format('X')} {a}."
    for e in world.entities:
        yield e.name
