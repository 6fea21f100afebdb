"""CounterFact-style requests from known facts (studies/known_edits.py): built as CounterFact
was, checked here on a hand-made fact list with a whitespace tokenizer (no model needed)."""

from __future__ import annotations

from factedit.studies.known_edits import KnownFact, build_requests, harmonic_s, subject_facts


class WordTok:
    """Each word is one token; ids are assigned on first sight."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.ids.setdefault(w, len(self.ids)) for w in text.split()]}


def _facts() -> list[KnownFact]:
    rows = [("{} is located in", "P17", "Paris", "France"), ("{} is located in", "P17", "Lyon", "France"),
            ("{} is located in", "P17", "Rome", "Italy"), ("{}, which is in", "P17", "Nice", "France"),
            ("{}, which is in", "P17", "Milan", "Italy"), ("{} speaks", "P37", "Paris", "French"),
            ("{} is made by", "P176", "iPhone", "Apple"), ("{} is made by", "P176", "iPad", "Apple")]
    return [KnownFact(t.format(s), t, s, a, rel) for t, rel, s, a in rows]


def test_requests_follow_counterfact_construction() -> None:
    facts, tok = _facts(), WordTok()
    reqs = build_requests(facts, tok, n=10, seed=0)
    assert reqs, "some facts have a paraphrase template, a neighbour and another attribute"
    by_subject = {(f.subject, f.template): f for f in facts}
    for r in reqs:
        f = by_subject[(r.subject, r.prompt)]
        assert r.target_true == f.attribute
        same_rel = [g for g in facts if g.relation == f.relation]
        # the new target: another attribute of the relation, with another first token
        assert r.target_new in {g.attribute for g in same_rel} and r.target_new != f.attribute
        # paraphrases: the relation's other templates, with this subject
        assert r.paraphrase_prompts == sorted(g.template.format(r.subject) for g in same_rel
                                              if g.template != f.template)[: len(r.paraphrase_prompts)]
        assert r.subject not in " ".join(r.neighborhood_prompts)
        assert all(any(p == g.prompt and g.attribute == f.attribute for g in same_rel)
                   for p in r.neighborhood_prompts)
    # the made-by relation has a single template: no paraphrase, so no request
    assert not any(r.subject.startswith("iP") for r in reqs)
    # one request per (subject, relation), case ids in order
    assert [r.case_id for r in reqs] == list(range(len(reqs)))
    assert len({(r.subject, r.prompt) for r in reqs}) == len(reqs)


def test_seed_changes_the_order_and_targets_reproducibly() -> None:
    facts = _facts()
    a = [(r.subject, r.target_new) for r in build_requests(facts, WordTok(), n=10, seed=1)]
    assert a == [(r.subject, r.target_new) for r in build_requests(facts, WordTok(), n=10, seed=1)]


def test_subject_facts_are_the_other_relations_of_the_subject() -> None:
    facts = _facts()
    reqs = build_requests(facts, WordTok(), n=10, seed=0)
    others = subject_facts(facts, reqs)
    for r in reqs:
        want = [f.prompt for f in facts if f.subject == r.subject and f.template != r.prompt
                and f.relation != "P17"]
        assert [f.prompt for f in others[r.case_id]] == want


def test_s_is_the_harmonic_mean() -> None:
    assert abs(harmonic_s({"ES": 100.0, "PS": 50.0, "NS": 100.0}) - 75.0) < 1e-9
    assert harmonic_s({"ES": 0.0, "PS": 100.0, "NS": 100.0}) < 1e-6


def _many_facts() -> list[KnownFact]:
    """Two templates of one relation, groups of several subjects per attribute, and a subject
    (Paris) known in two relations."""
    cities = {"France": ["Paris", "Lyon", "Nice", "Lille", "Brest"], "Italy": ["Rome", "Milan", "Turin", "Pisa"],
              "Spain": ["Madrid", "Seville", "Bilbao"]}
    out = [KnownFact(t.format(c), t, c, country, "P17")
           for country, cs in cities.items() for c in cs for t in ("{} is located in", "{}, which is in")]
    out += [KnownFact(f"{s} speaks", "{} speaks", s, lang, "P37")
            for s, lang in (("Paris", "French"), ("Lyon", "French"), ("Rome", "Italian"), ("Milan", "Italian"))]
    out += [KnownFact(f"{s} talks", "{} talks", s, lang, "P37")
            for s, lang in (("Paris", "French"), ("Lyon", "French"), ("Rome", "Italian"), ("Milan", "Italian"))]
    return out


def test_disjoint_requests_never_score_a_neighbour_that_the_batch_edits() -> None:
    facts = _many_facts()
    subject_of = {f.prompt: f.subject for f in facts}
    shared = build_requests(facts, WordTok(), n=100, seed=0)
    # CounterFact's rule alone: edited together, some requests' neighbours are other requests' subjects
    assert {subject_of[p] for r in shared for p in r.neighborhood_prompts} & {r.subject for r in shared}
    for seed in range(4):
        reqs = build_requests(facts, WordTok(), n=100, seed=seed, disjoint=True)
        assert len(reqs) >= 3
        edited = {r.subject for r in reqs}
        for r in reqs:
            f = next(g for g in facts if g.subject == r.subject and g.template == r.prompt)
            assert r.neighborhood_prompts, "every request keeps a neighbour"
            for p in r.neighborhood_prompts:
                g = next(g for g in facts if g.prompt == p)
                assert g.relation == f.relation and g.attribute == f.attribute and g.subject not in edited
        # a prefix of the list (a smaller batch) is the same requests
        assert [(r.subject, r.target_new) for r in build_requests(facts, WordTok(), n=3, seed=seed, disjoint=True)] \
            == [(r.subject, r.target_new) for r in reqs[:3]]
