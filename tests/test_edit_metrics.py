"""The edit benchmark's metrics (studies/edit_metrics.py) against independent naive computations:
the Wilson interval against the textbook quadratic and published values, the normal interval
against the statistics module, perplexity and "still predicted" against a token-by-token loop
on a tiny random GPT-2."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from factedit.editing.weights import WeightDelta
from factedit.studies.edit_metrics import (
    Z95,
    EditProbe,
    Fact,
    cell,
    checkpoints,
    hard_neighbours_of,
    hard_split,
    heldout_paragraphs,
    mean_interval,
    perplexity,
    pick_retention,
    prefix_delta,
    proportion,
    still_predicted,
    wilson,
)
from factedit.studies.known_edits import KnownFact

TEXTS = ["the cat sat on the mat and the dog sat on the rug", "a bird flew over the old bridge at dawn",
         "rain fell"]


class WordTok:
    """Each word one token; ids assigned on first sight (few words: within the tiny vocabulary)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.ids.setdefault(w, len(self.ids)) for w in text.split()]}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval(), WordTok()


def _textbook_wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """The two roots p of (k/n - p)² = z² p (1 - p) / n: the score test's acceptance region."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (8, 10), (10, 10), (37, 50), (1, 1), (123, 200)])
def test_wilson_is_the_textbook_interval(k, n):
    lo, hi = wilson(k, n)
    ref = _textbook_wilson(k, n, Z95)
    assert lo == pytest.approx(max(0.0, ref[0]), abs=1e-12) and hi == pytest.approx(min(1.0, ref[1]), abs=1e-12)


def test_wilson_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score, no continuity correction)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(1, 29) == pytest.approx((0.0061, 0.1718), abs=1e-4)
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_proportion_and_mean_interval():
    p = proportion(8, 10)
    assert p["pct"] == 80 and p["n"] == 10 and p["ci"] == pytest.approx([100 * x for x in wilson(8, 10)])
    assert proportion(0, 0)["pct"] is None and cell(proportion(0, 0)) == "—"
    assert cell(p) == "80 [49–94] (10)"
    xs = [1.0, 2.5, 4.0, 0.5, 3.0]
    m, lo, hi = mean_interval(xs)
    half = Z95 * statistics.stdev(xs) / math.sqrt(len(xs))
    assert m == pytest.approx(statistics.mean(xs)) and (lo, hi) == pytest.approx((m - half, m + half))
    assert mean_interval([2.0]) == (2.0, 2.0, 2.0) and mean_interval([]) is None


@torch.no_grad()
def test_perplexity_is_the_token_loop(tiny):
    model, tok = tiny
    nll, count = 0.0, 0
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        for t in range(1, len(ids)):  # each next token from its own prefix, one pass each
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
            nll += float(F.cross_entropy(logits[None].double(), torch.tensor([ids[t]])))
            count += 1
    assert perplexity(model, tok, TEXTS) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, tok, ["one"] + TEXTS) == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError):
        perplexity(model, tok, ["one"])


@torch.no_grad()
def _argmax_word(model, tok, prompt: str) -> int:
    return int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())


def _facts(model, tok) -> list[Fact]:
    """Facts half of which the tiny model predicts (attribute = the word of its argmax)."""
    words = {i: w for w, i in tok.ids.items()}
    out = []
    for i, (subject, prompt) in enumerate([("Ann", "Ann lives in"), ("Bob", "Bob lives in"), ("Cy", "Cy works at"),
                                           ("Dee", "Dee was born in"), ("Eve", "Eve plays the"),
                                           ("Fay", "Fay and Ann met in"), ("Gus", "Gus speaks")]):
        top = _argmax_word(model, tok, prompt)
        right = words.setdefault(top, f"w{top}")
        tok.ids.setdefault(right, top)
        out.append(Fact(prompt, right if i % 2 == 0 or i == 5 else "nowhere", subject, "r"))
    return out


def test_still_predicted_and_retention_pick(tiny):
    model, tok = tiny
    facts = _facts(model, tok)
    naive = [_argmax_word(model, tok, f.prompt) == tok(" " + f.attribute)["input_ids"][0] for f in facts]
    assert still_predicted(model, tok, facts) == naive and sum(naive) >= 3
    picked = pick_retention(facts + facts[:2], {"Cy"}, 10, seed=1, model=model, tok=tok)
    # Cy edited, "Fay and Ann met in" only when Ann is not edited; one per prompt; only predicted facts
    assert {f.subject for f in picked} == {f.subject for f, ok in zip(facts, naive) if ok and f.subject != "Cy"}
    assert len({f.prompt for f in picked}) == len(picked)
    assert "Fay" not in {f.subject for f in pick_retention(facts, {"Ann"}, 10, 1, model, tok)}
    again = pick_retention(list(reversed(facts)), {"Cy"}, 10, seed=1, model=model, tok=tok)
    assert again == picked  # the seed fixes the order, not the candidates' order
    assert pick_retention(facts, {"Cy"}, 2, seed=1, model=model, tok=tok) == picked[:2]


def test_hard_neighbours_and_probe_pooling(tiny):
    model, tok = tiny
    facts = _facts(model, tok)
    hard = [{"subject": f.subject, "prompt": f.prompt, "attribute": f.attribute,
             "shares": "target_true" if i % 2 else "target_new"} for i, f in enumerate(facts)]
    split = hard_split(hard + hard[:3])
    assert [f.prompt for f in split["target_true"]] == [f.prompt for f in facts[1::2]]
    probe = EditProbe({0: hard[:4], 1: hard[4:]}, facts, [], None, single_retention=3)
    req = [type("R", (), {"case_id": 0})(), type("R", (), {"case_id": 1})()]
    together = probe.scores(model, tok, req)
    ok = still_predicted(model, tok, facts)
    assert together["relation_new"]["k"] == sum(ok[0::2]) and together["relation_new"]["n"] == 4
    assert together["retention"]["k"] == sum(ok) and together["perplexity"] is None
    per = [probe.single(model, tok, r, with_perplexity=False) for r in req]
    pooled = probe.pooled(per)
    assert pooled["relation_true"]["k"] == sum(ok[1::2]) and pooled["relation_true"]["n"] == 3
    share = 100 * sum(ok[:3]) / 3
    assert pooled["retention"]["pct"] == pytest.approx(share) and pooled["retention"]["n"] == 2
    assert cell(pooled["retention"]).endswith("(2 edits × 3)") and pooled["perplexity"] is None


def test_known_1000_hard_neighbours():
    rows = [("Paris", "France", "P17"), ("Lyon", "France", "P17"), ("Rome", "Italy", "P17"),
            ("Milan", "Italy", "P17"), ("Oslo", "Norway", "P17")]
    facts = [KnownFact(f"{s} is in", "{} is in", s, a, r) for s, a, r in rows]
    req = type("R", (), {"case_id": 7, "subject": "Paris", "prompt": "{} is in", "target_true": "France",
                         "target_new": "Italy"})()
    hard = hard_neighbours_of(facts, [req], {"Paris", "Milan"})[7]
    assert [(h["subject"], h["shares"]) for h in hard] == [("Lyon", "target_true"), ("Rome", "target_new")]


def test_sequence_checkpoints_and_prefixes():
    assert checkpoints(25) == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]
    assert checkpoints(5) == [1, 2, 3, 4, 5] and checkpoints(1) == [1]
    steps = []
    for i in range(3):
        st = WeightDelta()
        st.add("m", torch.full((2, 1), float(i + 1)), torch.ones(1, 3))
        steps.append(st)
    assert torch.equal(prefix_delta(steps, 2).dense("m"), torch.full((2, 3), 3.0))


def test_heldout_text_is_fixed_prose():
    paras = heldout_paragraphs()
    assert len(paras) == 10 and 1300 < sum(len(p.split()) for p in paras) < 2000
