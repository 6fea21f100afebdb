"""Items 1 and 6 of the paper's study (``factedit.studies.paper``): the information flow.

Item 1, from the attention-knockout curves of the records: mean curves with 95% bands, the
first layer where each mean curve falls below -20% and -50%, and per fact whether relation
(non-subject) edges matter before subject edges. Item 6, two-hop flow: composed queries over a
country bridge, kept where the model answers both hops and the composed query; whether the
bridge shows up before the answer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from factedit.analysis.attribute_rate import keep_token
from factedit.analysis.circuit import LocateConfig
from factedit.analysis.knockout import strongest_layer
from factedit.analysis.locate import locate
from factedit.analysis.projection import components, rank_and_prob
from factedit.analysis.rerun import clean_run
from factedit.analysis.spans import target_token_ids, tokenize_with_subject
from factedit.audit.dataset import AuditFact
from factedit.audit.summary import _mean_band
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout
from factedit.studies.paper_record import SOURCES, _rs, _share

THRESHOLDS = (-20.0, -50.0)

# Two-hop queries over a country bridge: bridge relation -> how the composed query names the
# country; second relation -> (one-hop template about the country, composed template).
BRIDGES = {
    "P17": "where {} is located",
    "P27": "of which {} is a citizen",
    "P495": "where {} was created",
}
SECOND_HOPS = {
    "P36": ("The capital of {} is", "The capital of the country {} is"),
    "P30": ("{} belongs to the continent of", "The country {} belongs to the continent of"),
    "P37": ("In {}, the language spoken is", "In the country {}, the language spoken is"),
}


def first_below(curve: list[float], threshold: float) -> int | None:
    """The first index whose value is below ``threshold``, None if none is."""
    return next((i for i, v in enumerate(curve) if v < threshold), None)


def relation_first(rec_knockout: dict, threshold: float) -> bool | None:
    """Whether the non-subject curve crosses ``threshold`` at an earlier layer than the subject
    curve (a curve that never crosses counts as crossing after the last layer); None when
    neither crosses."""
    r, s = first_below(rec_knockout["non_subject"], threshold), first_below(rec_knockout["subject"], threshold)
    if r is None and s is None:
        return None
    big = len(rec_knockout["subject"])
    return (big if r is None else r) < (big if s is None else s)


def flow_summary(records: list[dict], n_layers: int) -> dict:
    """Item 1: mean curves with 95% bands, first crossings of the mean curves and per fact,
    relation-before-subject per fact."""
    out: dict = {"n": len(records), "curves": {}, "first_below": {}, "per_fact_first_below": {}}
    for s in SOURCES:
        mean, band = _mean_band([r["knockout"][s] for r in records])
        out["curves"][s] = {"mean": mean, "band95": band}
        out["first_below"][s] = {str(int(t)): first_below(mean, t) for t in THRESHOLDS}
        out["per_fact_first_below"][s] = {}
        for t in THRESHOLDS:
            layers = [first_below(r["knockout"][s], t) for r in records]
            crossed = [la for la in layers if la is not None]
            out["per_fact_first_below"][s][str(int(t))] = {
                "crossed_share": len(crossed) / len(records),
                "median_layer": statistics.median(crossed) if crossed else None}
        out["strongest_layer"] = out.get("strongest_layer", {})
        out["strongest_layer"][s] = strongest_layer(mean)
    rb = {}
    for t in THRESHOLDS:
        verdicts = [relation_first(r["knockout"], t) for r in records]
        rb[str(int(t))] = {"decided": sum(v is not None for v in verdicts), "share": _share(verdicts)}
    minima = [strongest_layer(r["knockout"]["non_subject"]) < strongest_layer(r["knockout"]["subject"])
              for r in records]
    rb["argmin"] = {"decided": len(minima), "share": _share(minima)}
    out["relation_before_subject"] = rb
    return out


# ---- two hops ----------------------------------------------------------------------------------

@torch.no_grad()
def _top1(adapter: ModelLayout, tok, prompt: str) -> int:
    ids = tok(prompt)["input_ids"]
    return int(clean_run(adapter, ids).logits.argmax())


@torch.no_grad()
def two_hop(adapter: ModelLayout, model, tok, known: list[dict], facts: list[AuditFact], cfg: LocateConfig,
            fp: str, max_chains: int, log: Callable[[str], None]) -> dict:
    """Item 6. Hop 1: a known fact of a bridge relation (its attribute is a country). Hop 2:
    the country's capital / continent / language asked directly: right when the model's top-1
    token is the dataset's answer where the dataset has the country as a subject of that
    relation, else the model's own answer (counted apart as "self-consistent"; a stopword or a
    token of 2 characters or fewer is not an answer). Composed:
    right when its top-1 is the hop-2 answer. A composed query shows a two-step flow when the
    bridge's first token reaches rank <= 10 in the logit lens of the last position (or of the
    last subject token) at a layer below the first layer where the answer is top-1 at the last
    position."""
    truth = {(f.subject, f.relation): f.attribute for f in facts}
    out: dict = {"bridge_facts": 0, "hop2_known": 0, "hop2_from_dataset": 0, "composed_right": 0,
                 "located": 0, "chains": []}
    for r in known:
        if r["relation"] not in BRIDGES:
            continue
        out["bridge_facts"] += 1
        country = r["attribute"]
        for rel2, (hop2_t, comp_t) in SECOND_HOPS.items():
            try:
                hop2_pred = _top1(adapter, tok, hop2_t.format(country))
            except FactEditError:
                continue
            if not keep_token(tok.decode([hop2_pred])):  # " the", " a": not an answer, even if consistent
                continue
            true2 = truth.get((country, rel2))
            if true2 is not None:
                if hop2_pred != target_token_ids(tok, hop2_t.format(country), true2)[0]:
                    continue
                out["hop2_from_dataset"] += 1
            out["hop2_known"] += 1
            composed = comp_t.format(BRIDGES[r["relation"]].format(r["subject"]))
            try:
                tp = tokenize_with_subject(tok, composed, r["subject"])
            except FactEditError:
                continue
            clean = clean_run(adapter, tp.input_ids)
            if int(clean.logits.argmax()) != hop2_pred:
                continue
            out["composed_right"] += 1
            if out["located"] >= max_chains:
                continue
            out["located"] += 1
            c = locate(tp.prompt, r["subject"], model=model, tokenizer=tok, config=cfg, fingerprint=fp, clean=clean)
            comp = components(adapter, tp.input_ids, clean)
            stream = comp.stream()
            bridge = target_token_ids(tok, r["prompt"], country)[0]
            L = adapter.n_layers
            rank_last, _ = rank_and_prob(adapter, stream[1:, tp.last], bridge, cfg.final_norm)
            rank_subj, _ = rank_and_prob(adapter, stream[1:, tp.last_subject], bridge, cfg.final_norm)
            ans = [la for la in range(L) if c.projection["resid_rank"][la] == 1]
            first_ans = ans[0] if ans else L
            best_last = min(range(L), key=lambda la: int(rank_last[la]))
            before = [la for la in range(first_ans) if int(rank_last[la]) <= 10 or int(rank_subj[la]) <= 10]
            out["chains"].append({
                "prompt": tp.prompt, "subject": r["subject"], "bridge": country, "answer": tok.decode([hop2_pred]),
                "hop2_truth": "dataset" if true2 is not None else "self-consistent",
                "bridge_rank_last": [int(x) for x in rank_last],
                "bridge_rank_last_subject": [int(x) for x in rank_subj],
                "bridge_best_layer_last": best_last, "answer_first_top1_layer": ans[0] if ans else None,
                "two_step": bool(before), "knockout": {s: _rs(c.knockout.curve(s)) for s in SOURCES},
                "extraction_heads": [[h.layer, h.head] for h in c.extraction_heads]})
    ch = out["chains"]
    out["two_step_share"] = _share(c["two_step"] for c in ch)
    if ch:
        out["knockout"] = {s: {"mean": m, "band95": b} for s in ("subject", "non_subject")
                           for m, b in [_mean_band([c["knockout"][s] for c in ch])]}
        out["relation_before_subject_-20"] = _share(relation_first(c["knockout"], -20.0) for c in ch)
    log(f"two-hop: {out['bridge_facts']} bridge facts, {out['hop2_known']} second hops answered, "
        f"{out['composed_right']} composed queries right, {out['located']} located")
    return out
