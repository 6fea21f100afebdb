"""The synthetic world: shape, determinism, held-out templates."""

import json

from factedit.world.corpus import bio_text, index_text, query_example, training_templates
from factedit.world.generate import World, generate_world


def test_generation_is_deterministic():
    a = generate_world(seed=3).to_json()
    b = generate_world(seed=3).to_json()
    c = generate_world(seed=4).to_json()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)


def test_world_meets_the_spec():
    w = generate_world(seed=0, n_entities=1000)
    assert len(w.entities) >= 1000
    assert len({e.name for e in w.entities}) == len(w.entities)
    assert len(w.relations) >= 7
    for r in w.relations.values():
        assert len(r.templates) + len(r.heldout_templates) >= 4
        assert r.heldout_templates and all("{}" in t for t in r.templates + r.heldout_templates)
    # attributes are shared: every relation has attributes held by several entities
    for rid in w.relations:
        values = [e.facts[rid] for e in w.entities]
        assert max(values.count(v) for v in set(values)) > 10
    assert 0 < sum(e.paraphrase_test for e in w.entities) < len(w.entities)


def test_roundtrip(tmp_path):
    w = generate_world(seed=1, n_entities=50)
    w.save(tmp_path / "world.json")
    data = json.loads((tmp_path / "world.json").read_text())
    assert set(data) >= {"seed", "relations", "entities"}
    assert set(data["relations"]["birthplace"]) >= {"templates", "heldout_templates", "attributes"}
    assert set(data["entities"][0]) >= {"name", "facts", "paraphrase_test"}
    assert World.load(tmp_path).to_json() == w.to_json()


def test_paraphrase_test_entities_never_see_heldout_templates():
    import random

    w = generate_world(seed=0, n_entities=60, paraphrase_test_fraction=0.5)
    rng = random.Random(0)
    for e in w.entities:
        for rid, rel in w.relations.items():
            seen = training_templates(w, e, rid)
            assert all((t in seen) != e.paraphrase_test for t in rel.heldout_templates)
        if e.paraphrase_test:
            texts = [bio_text(w, e, rng) for _ in range(20)] + [query_example(w, e, rng, 0.0)[0] for _ in range(50)]
            for rel in w.relations.values():
                for t in rel.heldout_templates:
                    assert not any(t.format(e.name) in x for x in texts)
        idx = index_text(w, e, rng)
        assert idx.startswith(e.name + " ")
        assert all(a in idx for a in e.facts.values())
