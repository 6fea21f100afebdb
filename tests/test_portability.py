"""Portability probes (studies/portability.py): which probes a request gets, on hand-made
countries with a whitespace tokenizer; on SmolLM2, the knowledge filter and the scores against
a plain forward pass."""

from __future__ import annotations

import pytest

from factedit.editing.requests import EditRequest
from factedit.studies.pool_base import PoolRequest
from factedit.studies.portability import Probe, candidate_probes


class WordTok:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.ids.setdefault(w, len(self.ids)) for w in text.split()]}


COUNTRIES = {"France": {"continent": "Europe", "language": "French", "currency": "euro", "capital": "Paris"},
             "Italy": {"continent": "Europe", "language": "Italian", "currency": "euro", "capital": "Rome"},
             "Japan": {"continent": "Asia", "language": "Japanese", "currency": "yen", "capital": "Tokyo"},
             "Peru": {"continent": "South America", "language": "", "currency": "sol", "capital": "Lima"}}


def _req(relation: str, subject: str, true: str, new: str, case_id: int) -> PoolRequest:
    return PoolRequest(EditRequest("{} is a city in the country of", subject, new, true, case_id=case_id),
                       "places", relation, "city")


def test_probes_follow_the_edited_link_and_tell_old_from_new():
    reqs = [_req("city_country", "Lyon", "France", "Italy", 0), _req("city_country", "Osaka", "Japan", "France", 1),
            _req("region_country", "Cusco", "Peru", "Japan", 2), _req("city_continent", "Nice", "Europe", "Asia", 3)]
    got = candidate_probes(reqs, COUNTRIES, WordTok())
    # Lyon: same continent and currency as Italy's -> the language only
    assert [p for p in got if p.case_id == 0] == [
        Probe(0, "language", "Lyon is a city in a country whose official language is", "French", "Italian")]
    assert {p.attribute: (p.old, p.new) for p in got if p.case_id == 1} == {
        "continent": ("Asia", "Europe"), "language": ("Japanese", "French"), "currency": ("yen", "euro")}
    # a region's probes say "region"; Peru's language is unknown: no language probe
    assert sorted(p.prompt for p in got if p.case_id == 2) == [
        "Cusco is a region in a country whose currency is the", "Cusco is a region on the continent of"]
    assert not [p for p in got if p.case_id == 3]  # not an edit of a country


@pytest.mark.real_model
def test_known_probes_and_scores_on_smollm2():
    import torch

    from factedit.models.zoo import is_pulled

    if not is_pulled("smollm2-135m"):
        pytest.skip("smollm2-135m is not pulled (`factedit models pull smollm2-135m`)")
    from factedit.models.loading import load_model
    from factedit.studies.portability import known_probes, score_probes

    model, tok = load_model("smollm2-135m")
    probes = [Probe(0, "language", "Osaka is a city in a country whose official language is", "Japanese", "French"),
              Probe(1, "currency", "Osaka is a city in a country whose currency is the", "yen", "euro"),
              Probe(2, "language", "Osaka is a city in a country whose official language is", "French", "Japanese")]

    def top(prompt):
        with torch.no_grad():
            return int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())

    first = {w: tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("Japanese", "French", "yen", "euro")}
    want = [p for p in probes if top(p.prompt) == first[p.old]]
    assert known_probes(model, tok, probes) == want and probes[2] not in want
    s = score_probes(model, tok, probes)
    assert s["ported"] == [top(p.prompt) == first[p.new] for p in probes]
    assert s["moved"][0] is (not s["moved"][2])  # the same prompt, old and new swapped
