"""What an edit keeps, with its n and a 95% interval: the metrics of the real-model edit
benchmark (``benchmarks/real_edit_quality.py``) beyond CounterFact's ES / PS / NS.

- **Subject specificity** (SF): the edited subject's other known facts still predicted.
- **Relation specificity**: the relation's *hard neighbours* (other subjects whose attribute
  is the edit's old target, ``shares: target_true``, or its new one, ``target_new``; see
  docs/pools.md) still predicted, each kind apart and apart from NS's neighbours.
- **Retention**: a fixed, seeded set of known facts of subjects no request edits
  (:func:`pick_retention`) still predicted.
- **Perplexity** of the model on fixed held-out English text (``factedit/data/heldout_text.json``,
  written for factedit, about 1,900 SmolLM2 tokens): token-level, ``exp`` of the mean NLL of
  every token of every paragraph but its first, each paragraph one pass (:func:`perplexity`).

"Still predicted" is known_1000's knowledge test: the top-1 next token after the prompt is the
first token of ``" " + attribute`` (:func:`still_predicted`).

Intervals (95%, ``z = 1.96``): the **Wilson score interval** for a proportion of facts
(:func:`wilson`), counts pooled over the requests (over single edits too: the facts of one
edit are not independent of each other, so the interval is a lower bound on the uncertainty
there); a **normal interval**, mean ± z·sd/√n with the sample sd (n - 1), for a mean of
per-edit scores (:func:`mean_interval`: single edits' retention share, perplexity rise).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from factedit.editing.weights import WeightDelta
from factedit.studies.pool_base import first_token, mentions, top1_tokens

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
HELDOUT_TEXT = Path(__file__).resolve().parent.parent / "data" / "heldout_text.json"


@dataclass(frozen=True)
class Fact:
    """A known fact: the filled prompt and the attribute the model should continue it with."""

    prompt: str
    attribute: str
    subject: str = ""
    relation: str = ""


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``k`` successes in ``n`` trials, as fractions (None for
    n = 0): (p + z²/2n ± z·√(p(1-p)/n + z²/4n²)) / (1 + z²/n), p = k/n."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(xs: Sequence[float], z: float = Z95) -> tuple[float, float, float] | None:
    """(mean, low, high): the normal interval mean ± z·sd/√n, sd the sample standard deviation
    (n - 1); the interval is the mean itself for one value; None for none."""
    n = len(xs)
    if n == 0:
        return None
    m = sum(xs) / n
    if n == 1:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)


def proportion(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` in %, with its Wilson interval in % (None where n = 0)."""
    ci = wilson(k, n)
    return {"pct": 100 * k / n if n else None, "k": k, "n": n,
            "ci": None if ci is None else [100 * ci[0], 100 * ci[1]], "interval": "wilson"}


def mean_summary(xs: Sequence[float]) -> dict[str, Any]:
    """The mean of per-edit values with its normal interval (None where there are none)."""
    r = mean_interval(xs)
    return {"mean": None if r is None else r[0], "n": len(xs), "ci": None if r is None else [r[1], r[2]],
            "interval": "normal"}


def still_predicted(model, tok, facts: Sequence[Fact]) -> list[bool]:
    """Per fact, whether the model's top-1 next token after its prompt is the attribute's first token."""
    if not facts:
        return []
    tops = top1_tokens(model, tok, [f.prompt for f in facts])
    return [t == first_token(tok, f.attribute) for t, f in zip(tops, facts)]


def kept(model, tok, facts: Sequence[Fact]) -> dict[str, Any]:
    """The share of ``facts`` still predicted (:func:`proportion`)."""
    return proportion(sum(still_predicted(model, tok, facts)), len(facts))


def heldout_paragraphs(path: str | Path = HELDOUT_TEXT) -> list[str]:
    """The held-out text's paragraphs (fixed; a change bumps the file's ``version``)."""
    return list(json.loads(Path(path).read_text())["paragraphs"])


@torch.no_grad()
def perplexity(model, tok, texts: Iterable[str]) -> float:
    """Token-level perplexity: exp of the mean NLL over every token of every text but its first
    (each text tokenised as the tokenizer does by default, one unpadded pass each)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]], device=device)  # (1, T)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V): the next token at each position
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    if not count:
        raise ValueError("no text of two tokens or more to score")
    return math.exp(total / count)


def pick_retention(candidates: Iterable[Fact], exclude: Iterable[str], n: int, seed: int, model,
                   tok) -> list[Fact]:
    """Up to ``n`` facts for retention, fixed by ``seed``: the ``candidates`` whose subject is
    not in ``exclude`` (the edited subjects) and whose prompt mentions none of them as a whole
    word, one per prompt, in a seeded order, kept where the model (unedited: call it before any
    edit) predicts them."""
    excluded = set(exclude)
    seen: dict[str, Fact] = {}
    for f in candidates:
        if f.prompt not in seen and f.subject not in excluded and not any(mentions(s, f.prompt) for s in excluded):
            seen[f.prompt] = f
    order = sorted(seen.values(), key=lambda f: (f.prompt, f.attribute))
    random.Random(seed).shuffle(order)
    out: list[Fact] = []
    step = max(64, 2 * n)
    for s in range(0, len(order), step):
        chunk = order[s : s + step]
        out += [f for f, ok in zip(chunk, still_predicted(model, tok, chunk)) if ok]
        if len(out) >= n:
            break
    return out[:n]


def hard_split(neighbours: Iterable[dict[str, str]]) -> dict[str, list[Fact]]:
    """Hard-neighbour records (``{subject, prompt, attribute, shares}``) as facts per ``shares``
    (``target_true``, ``target_new``), one per prompt each."""
    out: dict[str, dict[str, Fact]] = {"target_true": {}, "target_new": {}}
    for h in neighbours:
        out[h["shares"]].setdefault(h["prompt"], Fact(h["prompt"], h["attribute"], h.get("subject", "")))
    return {k: list(v.values()) for k, v in out.items()}


def hard_neighbours_of(facts: Sequence[Any], requests: Sequence[Any], exclude: Iterable[str]) -> dict[Any, list]:
    """known_1000's hard neighbours, as the pool's (factedit.studies.pools): per request (by case
    id), the known facts (``KnownFact``) of the request's relation whose attribute is its true or
    new target, of subjects not in ``exclude``."""
    excluded = set(exclude)
    out = {}
    for r in requests:
        rel = next(f.relation for f in facts if f.subject == r.subject and f.template == r.prompt)
        out[r.case_id] = [{"subject": f.subject, "prompt": f.prompt, "attribute": f.attribute,
                           "shares": "target_true" if f.attribute == r.target_true else "target_new"}
                          for f in facts if f.relation == rel and f.subject not in excluded
                          and f.attribute in (r.target_true, r.target_new)]
    return out


def checkpoints(length: int, parts: int = 10) -> list[int]:
    """The edit counts after which a sequence of ``length`` is scored: every ``1/parts`` of it
    (rounded up, without repeats), the whole sequence last."""
    return sorted({math.ceil(i * length / parts) for i in range(1, parts + 1)} - {0})


def prefix_delta(steps: Sequence[WeightDelta], k: int) -> WeightDelta:
    """The sum of a sequence's first ``k`` steps (``EditResult.steps``): the model after ``k`` edits."""
    out = WeightDelta(conv1d=steps[0].conv1d if steps else False)
    for st in steps[:k]:
        out.extend(st)
    return out


def cell(d: dict[str, Any] | None, key: str = "pct") -> str:
    """A table cell: ``93 [85–97] (40)``, the value, its interval and its n (``3 edits × 50``
    for a mean over single edits of a share of facts); ``—`` where none."""
    if not d or d.get(key) is None:
        return "—"
    ci = d.get("ci")
    span = f" [{ci[0]:.0f}–{ci[1]:.0f}]" if ci else ""
    n = f"{d['n']} edits × {d['facts']}" if d.get("facts") is not None else d["n"]
    return f"{d[key]:.0f}{span} ({n})"


@dataclass
class EditProbe:
    """The facts and text every method of a run is scored on, fixed before any edit: each
    request's hard neighbours (by case id), the retention facts, the held-out text and the
    unedited model's perplexity on it (None: perplexity not scored).

    Batches and sequences (:meth:`scores`): relation specificity over the requests' hard
    neighbours (one per prompt), retention over every retention fact, perplexity after the
    whole run. Single edits (:meth:`single`, then :meth:`pooled`): relation specificity's counts
    pooled over the edits; retention as the mean over edits of the share kept of the first
    ``single_retention`` retention facts; perplexity's rise on the first ``single_perplexity``
    edits only (the caller says which), its mean over them."""

    hard: dict[Any, list[dict[str, str]]]
    retention: list[Fact]
    texts: list[str]
    ppl_before: float | None
    single_retention: int = 50
    # case id -> the request's portability probes (factedit.studies.portability), where it has any
    probes: dict[Any, list[Any]] = field(default_factory=dict)

    @classmethod
    def build(cls, model, tok, hard: dict[Any, list[dict[str, str]]], retention: list[Fact],
              perplexity_text: bool = True, single_retention: int = 50) -> EditProbe:
        texts = heldout_paragraphs() if perplexity_text else []
        return cls(hard, retention, texts, perplexity(model, tok, texts) if texts else None, single_retention)

    def relation(self, model, tok, requests: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Relation specificity: the requests' hard neighbours still predicted, per ``shares``."""
        split = hard_split(h for r in requests for h in self.hard.get(r.case_id, []))
        return {k: kept(model, tok, facts) for k, facts in split.items()}

    def perplexity_after(self, model, tok) -> dict[str, Any] | None:
        if self.ppl_before is None:
            return None
        after = perplexity(model, tok, self.texts)
        return {"before": self.ppl_before, "after": after, "rise_pct": 100 * (after / self.ppl_before - 1)}

    def portability(self, model, tok, requests: Sequence[Any]) -> dict[str, dict[str, Any]] | None:
        """The requests' portability probes that port (top-1 the new consequence) and that moved
        (the new consequence beats the old), as proportions; None without probes."""
        from factedit.studies.portability import score_probes

        probes = [p for r in requests for p in self.probes.get(r.case_id, [])]
        if not probes:
            return None
        s = score_probes(model, tok, probes)
        return {k: proportion(sum(v), len(v)) for k, v in s.items()}

    def scores(self, model, tok, requests: Sequence[Any]) -> dict[str, Any]:
        """The model as it is now (apply the batch or sequence first)."""
        rel = self.relation(model, tok, requests)
        port = self.portability(model, tok, requests) or {}
        return {"portability": port.get("ported"), "portability_moved": port.get("moved"),
                "relation_true": rel["target_true"], "relation_new": rel["target_new"],
                "retention": {**kept(model, tok, self.retention), "how": "after the whole run"},
                "perplexity": self.perplexity_after(model, tok)}

    def single(self, model, tok, request: Any, with_perplexity: bool) -> dict[str, Any]:
        """One single edit's raw scores (apply it first): relation counts, retention share on the
        sample (in %), perplexity (None unless ``with_perplexity``)."""
        rel = self.relation(model, tok, [request])
        port = self.portability(model, tok, [request]) or {}
        counts = {f"{name}_{x}": port[key][x] if key in port else 0 for name, key in
                  (("portability", "ported"), ("portability_moved", "moved")) for x in ("k", "n")}
        sample = self.retention[: self.single_retention]
        ret = kept(model, tok, sample)
        ppl = self.perplexity_after(model, tok) if with_perplexity else None
        return {**counts, "relation_true_k": rel["target_true"]["k"], "relation_true_n": rel["target_true"]["n"],
                "relation_new_k": rel["target_new"]["k"], "relation_new_n": rel["target_new"]["n"],
                "retention_pct": ret["pct"], "retention_n": ret["n"],
                "ppl_after": None if ppl is None else ppl["after"],
                "ppl_rise_pct": None if ppl is None else ppl["rise_pct"]}

    def pooled(self, per: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Single edits' scores (:meth:`single`) together."""
        out: dict[str, Any] = {}
        for key in ("relation_true", "relation_new", "portability", "portability_moved"):
            n = sum(p.get(f"{key}_n", 0) for p in per)
            out[key] = proportion(sum(p.get(f"{key}_k", 0) for p in per), n) if n else None
        shares = [p["retention_pct"] for p in per if p["retention_pct"] is not None]
        ret, facts = mean_summary(shares), min(self.single_retention, len(self.retention))
        out["retention"] = {"pct": ret["mean"], "n": len(shares), "facts": facts, "ci": ret["ci"], "interval": "normal",
                            "how": f"mean over edits of the share kept of {facts} facts"}
        rises = [p["ppl_rise_pct"] for p in per if p.get("ppl_rise_pct") is not None]
        afters = [p["ppl_after"] for p in per if p.get("ppl_after") is not None]
        if self.ppl_before is None or not rises:
            out["perplexity"] = None
        else:
            rise = mean_summary(rises)
            out["perplexity"] = {"before": self.ppl_before, "after": sum(afters) / len(afters),
                                 "rise_pct": rise["mean"], "ci": rise["ci"], "n": len(rises), "interval": "normal",
                                 "how": f"mean over the first {len(rises)} edits"}
        return out


def subject_specificity(m: dict[str, Any]) -> dict[str, Any] | None:
    """SF of :func:`factedit.studies.known_edits.score_requests` (``k_SF`` of ``n_SF``) with its interval."""
    return proportion(m["k_SF"], m["n_SF"]) if m.get("n_SF") else None


def ppl_cell(p: dict[str, Any] | None) -> str:
    """``12.3 → 12.5 (+1.6% [0.9–2.3], n)``: before, after, the rise (its interval for single edits)."""
    if not p:
        return "—"
    ci = p.get("ci")
    span = f" [{ci[0]:+.2f}–{ci[1]:+.2f}]" if ci else ""
    n = f", {p['n']}" if p.get("n") else ""
    return f"{p['before']:.2f} → {p['after']:.2f} ({p['rise_pct']:+.2f}%{span}{n})"
