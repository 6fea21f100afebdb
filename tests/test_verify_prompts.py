"""verify's prompts on a real model, built from the pools' data (studies/verify_prompts.py):
checked against a direct reading of known_1000 and of a hand-made places list, with a
whitespace tokenizer and a stated knowledge test (no model)."""

from __future__ import annotations

import json

import pytest

from factedit.editing.requests import EditRequest
from factedit.studies import verify_prompts
from factedit.studies.pool_base import Relation, Subject

KNOWN_1000 = json.loads((verify_prompts.bundled("known_1000")).read_text())


class WordTok:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.ids.setdefault(w, len(self.ids)) for w in text.split()]}


UNKNOWN = ("A", "E", "I")  # the stated knowledge test: a subject starting with a vowel is not known


def _known_fn(model, tok):
    def known(prompts, attributes):
        return [not p.startswith(UNKNOWN) for p in prompts]
    return known


@pytest.fixture
def source(monkeypatch):
    monkeypatch.setattr(verify_prompts, "model_known_fn", _known_fn)
    monkeypatch.setattr(verify_prompts.places, "place_subjects", lambda: [
        Subject("Lyon", "city", (("in_country", "France"),)), Subject("Nice", "city", (("in_country", "France"),)),
        Subject("Osaka", "city", (("in_country", "Japan"),)), Subject("Arles", "city", (("in_country", "France"),)),
        Subject("Ibaraki", "city", (("in_country", "Japan"),))])
    monkeypatch.setattr(verify_prompts.places, "RELATIONS", (
        Relation("in_country", "city", ("{} is in", "{} lies in", "{} is a city of"), "country"),))
    return verify_prompts.pool_prompts(object(), WordTok(), n_neighbours=3, n_paraphrases=5)


def test_known_1000_prompts_follow_the_relation_and_its_facts(source):
    rec = next(r for r in KNOWN_1000 if r["relation_id"] == "P30" and r["attribute"] == "Antarctica")
    template = rec["prompt"].replace(rec["subject"], "{}", 1)
    got = source(EditRequest(template, rec["subject"], "Europe", "Antarctica"), "Antarctica")
    same_rel = [r for r in KNOWN_1000 if r["relation_id"] == "P30"]
    others = {r["prompt"].replace(r["subject"], "{}", 1) for r in same_rel} - {template}
    assert len(got.paraphrases) == min(5, len(others))
    assert {p.replace(rec["subject"], "{}", 1) for p in got.paraphrases} <= others
    want = {(template.format(r["subject"]), r["subject"]) for r in same_rel
            if r["attribute"].split()[0] == "Antarctica" and r["subject"] != rec["subject"]
            and not r["subject"].startswith(UNKNOWN)}
    assert {(n.prompt, n.subject) for n in got.neighbours} <= want
    assert len(got.neighbours) == min(3, len(want)) and got.source == "known_1000 relation P30"
    again = source(EditRequest(template, rec["subject"], "Europe", "Antarctica"), "Antarctica")
    assert again == got  # seeded by the subject


def test_places_neighbours_share_the_first_token_and_are_known(source):
    got = source(EditRequest("{} is in", "Paris", "Japan", "France"), "France")
    assert got.paraphrases == ["Paris lies in", "Paris is a city of"] and got.source == "places pool, in_country"
    assert sorted(n.subject for n in got.neighbours) == ["Lyon", "Nice"]  # Arles is not known, Osaka not France
    assert all(n.attribute == "France" for n in got.neighbours)


def test_unknown_neighbours_are_used_and_said_when_none_is_known(source):
    got = source(EditRequest("{} lies in", "Lyon", "Japan", "France"), "France")
    assert [n.subject for n in got.neighbours] == ["Nice"]  # the known one only, as the main prompt
    assert got.neighbours[0].prompt == "Nice lies in" and got.paraphrases == ["Lyon is in", "Lyon is a city of"]
    got = source(EditRequest("{} is in", "Osaka", "France", "Japan"), "Japan")
    assert [n.subject for n in got.neighbours] == ["Ibaraki"]
    assert got.source == "places pool, in_country (neighbours the model does not know)"


def test_a_prompt_of_no_relation_gets_nothing(source):
    assert source(EditRequest("{} is famous for", "Paris", "cheese"), "art") is None


def test_places_country_edits_get_the_consequences_the_model_answers(monkeypatch):
    """A city's country edited: its continent, language and currency asked through the link,
    where the two countries' first tokens differ and the model answers the true country's."""
    from factedit.studies import portability

    monkeypatch.setattr(verify_prompts, "model_known_fn", lambda model, tok: lambda prompts, attributes: [
        "currency" not in p for p in prompts])  # the stated test: the model knows no currency
    monkeypatch.setattr(verify_prompts.places, "place_subjects", lambda: [
        Subject("Lyon", "city", (("city_country", "France"),)), Subject("Osaka", "city", (("city_country", "Japan"),))])
    monkeypatch.setattr(verify_prompts.places, "RELATIONS", (
        Relation("city_country", "city", ("{} is a city in the country of", "{} lies in"), "country"),))
    monkeypatch.setattr(verify_prompts.places, "country_table", lambda: {
        "France": {"continent": "Europe", "language": "French", "currency": "Euro", "capital": "Paris"},
        "Japan": {"continent": "Asia", "language": "Japanese", "currency": "Yen", "capital": "Tokyo"},
        "Spain": {"continent": "Europe", "language": "Spanish", "currency": "Euro", "capital": "Madrid"}})
    source = verify_prompts.pool_prompts(object(), WordTok())
    got = source(EditRequest("{} is a city in the country of", "Lyon", "Japan", "France"), "France")
    t = portability.TEMPLATES
    assert [(c.what, c.prompt, c.old, c.new) for c in got.consequences] == [
        ("continent", t["continent"].format("Lyon", kind="city"), "Europe", "Asia"),
        ("language", t["language"].format("Lyon", kind="city"), "French", "Japanese")]
    same_continent = source(EditRequest("{} is a city in the country of", "Lyon", "Spain", "France"), "France")
    assert [c.what for c in same_continent.consequences] == ["language"]  # Europe = Europe, currency unknown
    other = source(EditRequest("{} lies in", "Osaka", "France", "Japan"), "Japan")
    assert [c.new for c in other.consequences] == ["Europe", "French"]
