"""The synthetic world of facts: entities with multi-token names and one attribute per relation.

Deterministic from a seed. Saved as ``world.json``::

    {"seed": 0,
     "relations": {"birthplace": {"templates": [...], "heldout_templates": [...],
                                  "attributes": [...]}, ...},
     "entities": [{"name": "Ada Lovelock", "facts": {"birthplace": "Paris", ...},
                   "paraphrase_test": true}, ...]}
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from factedit.io import atomic_write_text, dumps_json
from factedit.paths import world_file
from factedit.world import vocab


@dataclass(frozen=True)
class Relation:
    id: str
    templates: list[str]  # seen in training by every entity
    heldout_templates: list[str]  # never seen in training by paraphrase_test entities
    attributes: list[str]


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str]  # relation id -> attribute
    paraphrase_test: bool = False


@dataclass
class World:
    seed: int
    relations: dict[str, Relation]
    entities: list[Entity]
    meta: dict = field(default_factory=dict)

    # ---- queries --------------------------------------------------------------------
    def prompts(self, entity: Entity, heldout: bool = False) -> list[tuple[str, str, str]]:
        """(relation id, prompt, attribute) for every template of the chosen kind."""
        out = []
        for rid, rel in self.relations.items():
            for t in rel.heldout_templates if heldout else rel.templates:
                out.append((rid, t.format(entity.name), entity.facts[rid]))
        return out

    def entity(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(f"no entity named {name!r} in this world")

    # ---- (de)serialisation -----------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "meta": self.meta,
            "relations": {
                rid: {
                    "templates": r.templates,
                    "heldout_templates": r.heldout_templates,
                    "attributes": r.attributes,
                }
                for rid, r in self.relations.items()
            },
            "entities": [
                {"name": e.name, "facts": e.facts, "paraphrase_test": e.paraphrase_test}
                for e in self.entities
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> World:
        try:
            relations = {
                rid: Relation(rid, list(r["templates"]), list(r["heldout_templates"]),
                              list(r["attributes"]))
                for rid, r in data["relations"].items()
            }
            entities = [
                Entity(e["name"], dict(e["facts"]), bool(e.get("paraphrase_test", False)))
                for e in data["entities"]
            ]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"world.json is malformed: missing or invalid field {exc}") from exc
        return cls(int(data.get("seed", 0)), relations, entities, dict(data.get("meta", {})))

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), dumps_json(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> World:
        path = Path(path)
        if path.is_dir():
            path = path / "world.json"
        if not path.is_file():
            raise FileNotFoundError(f"no world file at {path}: pass a world.json or its folder")
        from factedit.errors import FactEditError
        from factedit.io import read_json
        from factedit.validate import world_problem

        data = read_json(path, "world file")
        problem = world_problem(data)
        if problem is not None:
            raise FactEditError(f"world file {path} is malformed: {problem}: restore the model folder's world.json "
                                "(written by `factedit world train`)")
        return cls.from_json(data)

    @classmethod
    def of(cls, model) -> World | None:
        """The world a world model (loaded, or its folder) was trained on; None for other models."""
        path = world_file(model)
        return cls.load(path) if path is not None else None


def _name_parts(rng: random.Random, syllables: list[str], endings: list[str], n: int) -> list[str]:
    pool = sorted({s + e for s in syllables for e in endings})
    rng.shuffle(pool)
    if n > len(pool):
        raise ValueError(f"asked for {n} name parts but only {len(pool)} exist")
    return pool[:n]


def generate_world(
    seed: int = 0,
    n_entities: int = 1200,
    n_first: int = 110,
    n_last: int = 140,
    paraphrase_test_fraction: float = 0.2,
    n_heldout: int = 1,
) -> World:
    """Build a world deterministically from ``seed``.

    Names are ``First Last`` with both parts drawn from shared pools, so each part is seen
    with many entities and only the whole name determines the facts. Attributes are drawn
    uniformly from each relation's pool, so every attribute is shared by many entities.
    """
    if n_entities > n_first * n_last:
        raise ValueError("n_entities exceeds the number of distinct first/last name pairs")
    rng = random.Random(seed)
    firsts = _name_parts(rng, vocab.FIRST_SYLLABLES, vocab.FIRST_ENDINGS, n_first)
    lasts = _name_parts(rng, vocab.LAST_SYLLABLES, vocab.LAST_ENDINGS, n_last)
    pairs = [(f, sname) for f in firsts for sname in lasts]
    rng.shuffle(pairs)
    relations = {
        rid: Relation(rid, r["templates"][:-n_heldout], r["templates"][-n_heldout:],
                      list(r["attributes"]))
        for rid, r in vocab.RELATIONS.items()
    }
    entities = []
    n_test = round(paraphrase_test_fraction * n_entities)
    for i, (first, last) in enumerate(pairs[:n_entities]):
        facts = {rid: rng.choice(r.attributes) for rid, r in relations.items()}
        entities.append(Entity(f"{first} {last}", facts, paraphrase_test=i < n_test))
    rng.shuffle(entities)
    return World(seed, relations, entities)
