"""The paper's study (Geva et al. 2023, "Dissecting Recall of Factual Associations") on one
model and dataset, with the two extensions of the review it grew from.

``run_study`` locates the recall circuit of every known fact (``factedit.analysis.locate``,
one clean pass per prompt reused by every sweep) and aggregates:

1. information flow: attention-knockout curves with 95% bands, the first layer where each
   mean curve falls below -20% and -50%, and per fact whether relation (non-subject) edges
   matter before subject edges;
2. subject enrichment: the attribute rate by layer and position, through the logit lens and
   the raw unembedding, beside a control (another subject's related tokens);
3. attribute extraction: MHSA and MLP extraction events by layer (both projections), the share
   of facts with an extraction head, the heads' OV check, and the attribute's rank in the
   subject representation just before the first MHSA extraction event;
4. early against upper MLPs: the MLP updates at the subject positions removed in the first
   window against the last window below the read layer (``analysis.sublayer_window`` layers);
5. paraphrase stability: the relation's other templates of the dataset filled with the
   subject; Jaccard overlap of extraction heads, shift of the subject-knockout window and of
   the enrichment layers; per relation, stable and wording-dependent heads; the audit's
   ``robustness`` aggregate over the same records;
6. two-hop flow: composed queries over a country bridge (capital, continent, language of the
   country where / of which the subject ...), kept where the model answers both hops and the
   composed query; whether the bridge shows up before the answer.

The related-token text for the attribute rate (the paper used Wikipedia paragraphs, never
released): a user JSON file {subject: text}; for a world model, the subject's attributes in
the world; otherwise, by default, a short article the model itself writes about the subject
(greedy, from "Here is a short article about {subject}.", ``description_tokens`` tokens, 64),
without the subject's own name tokens. See ``describe_subjects``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from factedit.analysis.attribute_rate import attribute_rate, keep_token, related_tokens
from factedit.analysis.circuit import LocateConfig
from factedit.analysis.knockout import strongest_layer, window_layers
from factedit.analysis.locate import check_length, locate
from factedit.analysis.projection import components, rank_and_prob
from factedit.analysis.rerun import clean_run
from factedit.analysis.spans import target_token_ids, tokenize_with_subject
from factedit.audit.dataset import AuditFact, relation_templates, template_of
from factedit.audit.summary import _mean_band, robustness
from factedit.errors import FactEditError
from factedit.io import atomic_write_text, dumps_json
from factedit.models.adapter import ModelAdapter
from factedit.models.fingerprint import model_fingerprint

FORMAT = "factedit.study/1"
SOURCES = ("subject", "non_subject", "last")
POSITIONS = ("first_subject", "last_subject", "after_subject", "last")
THRESHOLDS = (-20.0, -50.0)
DESCRIBE_PROMPT = "Here is a short article about {}.\n\n"

# What the paper reports, as summarised in ../shared/reference.md and the review in
# ../shared/seeds (GPT-2 XL; GPT-J values are not in those notes: "n/r").
PAPER = {
    "knockout_window": ("9 of 48 layers", "n/r"),
    "subject_first_below_-50": ("upper layers (qualitative)", "n/r"),
    "relation_first_below": ("earlier than the subject's (qualitative)", "n/r"),
    "relation_before_subject": ("yes: relation edges matter first", "n/r"),
    "attribute_rate_last_subject_max": ("~0.50, upper-middle layers", "n/r"),
    "attribute_rate_other_positions_max": ("far lower than the last subject token", "n/r"),
    "mhsa_extraction_share": ("~0.68 of facts", "n/r"),
    "mlp_extraction_share": ("much rarer than MHSA", "n/r"),
    "extraction_head_share": ("heads act as knowledge hubs", "n/r"),
    "ov_rank_le10_share": ("heads' OV maps rank the attribute high", "n/r"),
    "not_top_in_subject_share": ("attribute often low in the subject before extraction", "n/r"),
    "early_mlp_rate_drop": ("large (early MLPs matter)", "n/r"),
    "upper_mlp_rate_drop": ("small", "n/r"),
    "paraphrase_head_jaccard": ("not studied", "not studied"),
    "two_hop_two_step_share": ("not studied", "not studied"),
}

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


class StudyError(FactEditError):
    pass


@dataclass
class StudyOptions:
    related: str = "auto"  # "auto" (world attributes, else "model"), "model", "dataset", or a JSON file path
    paraphrases: int = 2  # paraphrase prompts located per known fact (0: skip item 5)
    two_hop: bool = True
    max_chains: int = 40  # composed queries located at most
    description_tokens: int = 64
    describe_batch: int = 16
    seed: int = 0


@dataclass
class Study:
    """What ``run_study`` returns: the aggregates (``summary``) and per-fact records."""

    summary: dict
    records: list[dict] = field(default_factory=list)
    paraphrases: list[dict] = field(default_factory=list)
    chains: list[dict] = field(default_factory=list)


# ---- small pure helpers (tested against naive computations) -----------------------------------

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


def jaccard(a: set, b: set) -> float | None:
    """|a & b| / |a | b|; None when both are empty (counted apart, as the audit does)."""
    if not a and not b:
        return None
    return len(a & b) / len(a | b)


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _share(xs) -> float | None:
    xs = [bool(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ---- facts ------------------------------------------------------------------------------------

def primary_facts(facts: list[AuditFact], limit: int | None) -> list[AuditFact]:
    """One prompt per (subject, relation) group, the first in dataset order; the first
    ``limit`` groups."""
    seen, out = set(), []
    for f in facts:
        if f.group in seen:
            continue
        seen.add(f.group)
        out.append(f)
        if limit is not None and len(out) >= limit:
            break
    return out


@torch.no_grad()
def known_prompt(adapter: ModelAdapter, tok, prompt: str, subject: str, attribute: str):
    """(tokenized prompt, clean run) when the model's top-1 token is the attribute's first
    token, else None (prompts factedit cannot take are None too)."""
    try:
        tp = tokenize_with_subject(tok, prompt, subject)
        check_length(adapter.model, tp)
        want = target_token_ids(tok, tp.prompt, attribute)[0]
    except FactEditError:
        return None
    clean = clean_run(adapter, tp.input_ids)
    return (tp, clean) if int(clean.logits.argmax()) == want else None


# ---- related-token texts ------------------------------------------------------------------------

@torch.no_grad()
def describe_subjects(model, tok, subjects: list[str], max_new_tokens: int = 32, batch: int = 16) -> dict[str, str]:
    """The offline default for the attribute rate's text about a subject: a short article the
    model writes itself, greedy, after ``DESCRIBE_PROMPT``. It is what the model associates
    with the subject (not necessarily true), the prompt does not end at the subject (so the
    text is not simply the last subject token's own next-token prediction), and it needs no
    download. Left-padded batches."""
    device = next(model.parameters()).device
    out: dict[str, str] = {}
    side = tok.padding_side
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.padding_side = "left"
    try:
        todo = sorted(set(subjects))
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            enc = tok([DESCRIBE_PROMPT.format(s) for s in chunk], return_tensors="pt", padding=True)
            if "attention_mask" not in enc:
                enc["attention_mask"] = torch.ones_like(enc["input_ids"])
            gen = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            n = enc["input_ids"].shape[1]
            for s, row in zip(chunk, gen):
                out[s] = tok.decode(row[n:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def related_set(tok, text: str | list[str], subject: str) -> set[int]:
    """The related tokens of a text (``related_tokens``), without the subject's own name tokens
    (a description repeats the name; the paper's count is about attributes)."""
    return related_tokens(tok, text) - related_tokens(tok, subject)


# ---- one fact ----------------------------------------------------------------------------------

def _r(x: float) -> float:
    return round(float(x), 6)


def _rs(xs) -> list | None:
    return None if xs is None else [_r(x) for x in xs]


@torch.no_grad()
def fact_record(adapter: ModelAdapter, model, tok, tp, clean, fact: AuditFact, cfg: LocateConfig, fp: str,
                related: set[int] | None, control: set[int] | None) -> dict:
    """One known prompt's measures: its recall circuit (``locate``) plus the raw-unembedding
    attribute rate and extraction events, the control attribute rate and the attribute's rank
    in the subject representation before extraction."""
    c = locate(tp.prompt, fact.subject, model=model, tokenizer=tok, related=related if related else None,
               config=cfg, fingerprint=fp, clean=clean)
    comp = components(adapter, tp.input_ids, clean)
    stream = comp.stream()  # (L+1, T, d)
    token, L, k = c.target_id, adapter.n_layers, cfg.attribute_top_k
    s0, ls, q = tp.subject_span[0], tp.last_subject, tp.last
    rec = {"index": fact.index, "prompt": tp.prompt, "subject": fact.subject, "attribute": fact.attribute,
           "relation": fact.relation, "group": fact.group, "template": template_of(tp.prompt, fact.subject),
           "prediction": c.prediction, "prediction_prob": _r(c.prediction_prob),
           "knockout": {s: _rs(c.knockout.curve(s)) for s in SOURCES}}

    def rates(final_norm: bool, ids: set[int]) -> dict[str, list[float]]:
        pos = {"first_subject": s0, "last_subject": ls, "last": q}
        out = {name: attribute_rate(adapter, tok, stream[:, p], ids, k, final_norm) for name, p in pos.items()}
        later = list(range(tp.subject_span[1], q))
        if later:
            per = attribute_rate(adapter, tok, stream[:, later].transpose(0, 1).reshape(-1, stream.shape[-1]),
                                 ids, k, final_norm)
            out["after_subject"] = [sum(per[j * (L + 1) + la] for j in range(len(later))) / len(later)
                                    for la in range(L + 1)]
        return {n: _rs(v) for n, v in out.items()}

    rec["attribute_rate"] = None
    if related:
        rec["attribute_rate"] = {"logit_lens" if cfg.final_norm else "raw": {n: _rs(v) for n, v in
                                                                             c.attribute_rate_by_position.items()}}
        other = not cfg.final_norm
        rec["attribute_rate"]["logit_lens" if other else "raw"] = rates(other, related)
        if control:
            rec["attribute_rate"]["control_last_subject"] = _rs(
                attribute_rate(adapter, tok, stream[:, ls], control, k, cfg.final_norm))

    events = {"logit_lens" if cfg.final_norm else "raw": c.extraction_events}
    other = {}
    for kind, vecs in (("attn", comp.attn), ("mlp", comp.mlp)):
        r, _p = rank_and_prob(adapter, vecs, token, not cfg.final_norm)
        other[kind] = [la for la in range(L) if int(r[la]) == 1]
    events["raw" if cfg.final_norm else "logit_lens"] = other
    rec["extraction_events"] = events
    rec["extraction_heads"] = [[h.layer, h.head, _r(h.score), h.rank, h.ov_rank] for h in c.extraction_heads]
    ev = c.extraction_events["attn"]
    rec["first_mhsa_event"] = ev[0] if ev else None
    rec["attribute_rank_in_subject"] = None
    if ev:  # what the heads of that layer read at the last subject token: the input of block ev[0]
        r, _p = rank_and_prob(adapter, stream[ev[0], ls], token, cfg.final_norm)
        rec["attribute_rank_in_subject"] = int(r)
    sk = c.sublayer_knockout
    rec["sublayer_knockout"] = {
        "window": sk.window, "read_layer": sk.read_layer, "base_attribute_rate": sk.base_attribute_rate,
        "base_extraction": _r(sk.base_extraction),
        "mlp_attribute_rate": _rs(None if sk.attribute_rate is None else sk.attribute_rate["mlp"]),
        "mlp_extraction": _rs(None if sk.extraction is None else sk.extraction["mlp"]),
        "mlp_prob_change": _rs(sk.prob_change["mlp"])}
    rec["enrichment_mlps"] = [m.layer for m in c.enrichment_mlps]
    rec["projection_rank"] = {kind: c.projection[f"{kind}_rank"] for kind in ("resid", "attn", "mlp")}
    return rec


# ---- aggregates --------------------------------------------------------------------------------

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


def enrichment_summary(records: list[dict]) -> dict | None:
    rated = [r for r in records if r.get("attribute_rate")]
    if not rated:
        return None
    out: dict = {"n": len(rated)}
    for proj in ("logit_lens", "raw"):
        out[proj] = {}
        for pos in POSITIONS:
            rows = [r["attribute_rate"][proj][pos] for r in rated if pos in r["attribute_rate"][proj]]
            if rows:
                mean = _mean_band(rows)[0]
                out[proj][pos] = {"mean": mean, "max": max(mean), "max_layer": argmax(mean), "facts": len(rows)}
    ctrl = [r["attribute_rate"]["control_last_subject"] for r in rated if "control_last_subject" in r["attribute_rate"]]
    if ctrl:
        mean = _mean_band(ctrl)[0]
        out["control_last_subject"] = {"mean": mean, "max": max(mean), "facts": len(ctrl)}
    return out


def extraction_summary(records: list[dict], n_layers: int) -> dict:
    n = len(records)
    out: dict = {"n": n}
    for proj in ("logit_lens", "raw"):
        ev = [r["extraction_events"][proj] for r in records]
        out[proj] = {
            "rate_by_layer": {kind: [sum(la in e[kind] for e in ev) / n for la in range(n_layers)]
                              for kind in ("attn", "mlp")},
            "facts_with_event": {kind: sum(bool(e[kind]) for e in ev) / n for kind in ("attn", "mlp")},
        }
    out["facts_with_extraction_head"] = sum(bool(r["extraction_heads"]) for r in records) / n
    ov = [h[4] for r in records for h in r["extraction_heads"] if h[4] is not None]
    out["ov_check"] = {"heads_checked": len(ov),
                       "rank1_share": _share([x == 1 for x in ov]),
                       "rank_le10_share": _share([x <= 10 for x in ov]),
                       "median_rank": statistics.median(ov) if ov else None}
    ranks = [r["attribute_rank_in_subject"] for r in records if r["attribute_rank_in_subject"] is not None]
    out["subject_rank_before_extraction"] = {
        "facts": len(ranks), "not_top1_share": _share([x > 1 for x in ranks]),
        "rank_gt10_share": _share([x > 10 for x in ranks]),
        "median_rank": statistics.median(ranks) if ranks else None}
    hubs = Counter((h[0], h[1]) for r in records for h in r["extraction_heads"])
    out["hubs"] = [{"layer": la, "head": h, "facts": c} for (la, h), c in hubs.most_common(10)]
    return out


def early_mlp_summary(records: list[dict], n_layers: int) -> dict | None:
    """Item 4: MLP updates at the subject positions removed over the first window (layers
    0..w-1) against the last window that ends below the read layer."""
    if not records:
        return None
    sk0 = records[0]["sublayer_knockout"]
    w, read = sk0["window"], sk0["read_layer"]
    centres = range(n_layers)
    early = next(c for c in centres if window_layers(c, w, n_layers).start == 0
                 and window_layers(c, w, n_layers).stop == min(w, n_layers))
    below = [c for c in centres if window_layers(c, w, n_layers).stop <= read]
    upper = max(below, key=lambda c: (window_layers(c, w, n_layers).stop, c)) if below else None
    out: dict = {"n": len(records), "window": w, "read_layer": read,
                 "early_window": list(window_layers(early, w, n_layers)),
                 "upper_window": None if upper is None else list(window_layers(upper, w, n_layers))}
    rated = [r for r in records if r["sublayer_knockout"]["mlp_attribute_rate"] is not None]

    # change (%) of the mean over facts of the largest MHSA p(attribute) at the last position
    # (a ratio of means: a mean of per-fact ratios is dominated by facts with a tiny base)
    base_ext = _mean(r["sublayer_knockout"]["base_extraction"] for r in records)

    def ext_change(c):
        after = _mean(r["sublayer_knockout"]["mlp_extraction"][c] for r in records)
        return (after - base_ext) / base_ext * 100 if base_ext else None

    curves = {"extraction_change": [ext_change(c) for c in centres],
              "prob_change": [_mean(r["sublayer_knockout"]["mlp_prob_change"][c] for r in records) for c in centres]}
    if rated:
        curves["attribute_rate_drop"] = [
            _mean(r["sublayer_knockout"]["base_attribute_rate"] - r["sublayer_knockout"]["mlp_attribute_rate"][c]
                  for r in rated) for c in centres]
        out["base_attribute_rate"] = _mean(r["sublayer_knockout"]["base_attribute_rate"] for r in rated)
    out["curves"] = curves
    for name, c in (("early", early), ("upper", upper)):
        out[name] = None if c is None else {k: v[c] for k, v in curves.items()}
    return out


def paraphrase_summary(pairs: list[dict], records: list[dict], para_records: list[dict]) -> dict:
    """Item 5, from (original, paraphrase) pairs of located prompts."""
    out: dict = {"pairs": len(pairs), "facts": len({p["index"] for p in pairs})}
    if not pairs:
        return out
    out["head_jaccard"] = {"mean": _mean(p["head_jaccard"] for p in pairs),
                           "both_empty_pairs": sum(p["head_jaccard"] is None for p in pairs)}
    out["subject_window_shift"] = {"mean_abs": _mean(abs(p["subject_window_shift"]) for p in pairs),
                                   "same_share": _share(p["subject_window_shift"] == 0 for p in pairs)}
    out["enrichment_peak_shift"] = {"mean_abs": _mean(None if p["enrichment_peak_shift"] is None
                                                      else abs(p["enrichment_peak_shift"]) for p in pairs)}
    out["enrichment_mlp_jaccard"] = {"mean": _mean(p["enrichment_mlp_jaccard"] for p in pairs)}
    # per relation: heads found under every template of the relation seen here (stable hubs)
    # against heads found at least twice but under one template only (wording-dependent)
    by_rel: dict[str, dict[tuple[int, int], set[str]]] = defaultdict(lambda: defaultdict(set))
    counts: dict[str, Counter] = defaultdict(Counter)
    templates: dict[str, set[str]] = defaultdict(set)
    for r in records + para_records:
        templates[r["relation"]].add(r["template"])
        for h in r["extraction_heads"]:
            by_rel[r["relation"]][(h[0], h[1])].add(r["template"])
            counts[r["relation"]][(h[0], h[1])] += 1
    per_rel = {}
    for rel in sorted(templates):
        if len(templates[rel]) < 2:
            continue
        heads = by_rel[rel]
        per_rel[rel] = {
            "templates": len(templates[rel]),
            "stable_hubs": [f"L{la}H{h}" for (la, h), ts in sorted(heads.items()) if ts == templates[rel]],
            "wording_dependent": [f"L{la}H{h}" for (la, h), ts in sorted(heads.items())
                                  if len(ts) == 1 and counts[rel][(la, h)] >= 2],
        }
    out["per_relation"] = per_rel
    out["robustness"] = robustness([{"relation": r["relation"], "group": r["group"],
                                     "extraction_heads": [h[:3] for h in r["extraction_heads"]]}
                                    for r in records + para_records])
    return out


def pair_measures(a: dict, b: dict) -> dict:
    """Stability measures of one (original, paraphrase) pair of records."""
    ha = {(h[0], h[1]) for h in a["extraction_heads"]}
    hb = {(h[0], h[1]) for h in b["extraction_heads"]}
    peak = None
    if a.get("attribute_rate") and b.get("attribute_rate"):
        peak = (argmax(b["attribute_rate"]["logit_lens"]["last_subject"])
                - argmax(a["attribute_rate"]["logit_lens"]["last_subject"]))
    return {"index": a["index"], "relation": a["relation"], "original": a["prompt"], "paraphrase": b["prompt"],
            "head_jaccard": jaccard(ha, hb),
            "subject_window_shift": (strongest_layer(b["knockout"]["subject"])
                                     - strongest_layer(a["knockout"]["subject"])),
            "enrichment_peak_shift": peak,
            "enrichment_mlp_jaccard": jaccard(set(a["enrichment_mlps"]), set(b["enrichment_mlps"]))}


# ---- two hops ----------------------------------------------------------------------------------

@torch.no_grad()
def _top1(adapter: ModelAdapter, tok, prompt: str) -> int:
    ids = tok(prompt)["input_ids"]
    return int(clean_run(adapter, ids).logits.argmax())


@torch.no_grad()
def two_hop(adapter: ModelAdapter, model, tok, known: list[dict], facts: list[AuditFact], cfg: LocateConfig,
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


# ---- the study ---------------------------------------------------------------------------------

def load_related_file(path: str | Path) -> dict[str, str]:
    from factedit.io import read_json

    data = read_json(path, "--related file")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, (str, list))
                                             for k, v in data.items()):
        raise StudyError(f"--related {path} must be a JSON object {{subject: text}}")
    return data


@torch.no_grad()
def run_study(facts: list[AuditFact], *, model, tokenizer, config: LocateConfig, limit: int | None = None,
              options: StudyOptions | None = None, world=None, dataset_name: str = "",
              out: str | Path | None = None, log: Callable[[str], None] = lambda m: None) -> Study:
    """The study of ``facts`` (the first ``limit`` subject-relation groups) on ``model``; writes
    ``study.json`` and the figures into ``out`` when given (checked by the caller)."""
    opt = options or StudyOptions()
    tok = tokenizer
    adapter = ModelAdapter(model)
    L = adapter.n_layers
    cfg = config.resolved(L)
    fp = model_fingerprint(model)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    primaries = primary_facts(facts, limit)
    templates = relation_templates(facts)
    kept = []
    for f in primaries:
        got = known_prompt(adapter, tok, f.prompt, f.subject, f.attribute)
        if got is not None:
            kept.append((f, *got))
    times["known_filter"] = time.perf_counter() - t0
    log(f"{len(kept)} of {len(primaries)} facts known")

    # related-token texts
    t = time.perf_counter()
    source = opt.related
    if source == "auto":
        source = "world" if world is not None else "model"
    texts: dict[str, str | list[str]] = {}
    subjects = sorted({f.subject for f, _tp, _c in kept})
    if source == "world":
        if world is None:
            raise StudyError("--related world needs a world model")
        for s in subjects:
            try:
                texts[s] = list(world.entity(s).facts.values())
            except KeyError:
                pass
    elif source == "model":
        texts = dict(describe_subjects(model, tok, subjects, opt.description_tokens, opt.describe_batch))
    elif source == "dataset":
        by_subject: dict[str, list[str]] = defaultdict(list)
        for f in facts:
            by_subject[f.subject].append(f.attribute)
        texts = {s: by_subject[s] for s in subjects}
    else:
        given = load_related_file(source)
        texts = {s: given[s] for s in subjects if s in given}
        source = f"file:{source}"
    rel_sets = {s: related_set(tok, v, s) for s, v in texts.items()}
    times["related_texts"] = time.perf_counter() - t

    # items 1-4
    t = time.perf_counter()
    records = []
    for i, (f, tp, clean) in enumerate(kept):
        rel = rel_sets.get(f.subject)
        other = subjects[(subjects.index(f.subject) + 1) % len(subjects)] if len(subjects) > 1 else None
        control = rel_sets.get(other) if other is not None else None
        records.append(fact_record(adapter, model, tok, tp, clean, f, cfg, fp, rel, control))
        if (i + 1) % 25 == 0:
            log(f"located {i + 1}/{len(kept)}")
    times["locate"] = time.perf_counter() - t

    # item 5
    t = time.perf_counter()
    pairs, para_records = [], []
    if opt.paraphrases > 0:
        for rec, (f, _tp, _c) in zip(records, kept):
            n = 0
            for tmpl in templates.get(f.relation, []):
                if n >= opt.paraphrases:
                    break
                if tmpl == rec["template"]:
                    continue
                got = known_prompt(adapter, tok, tmpl.replace("{}", f.subject, 1), f.subject, f.attribute)
                if got is None:
                    continue
                pf = AuditFact(f.index, got[0].prompt, f.subject, f.attribute, f.relation, f.group, f.source_id)
                pr = fact_record(adapter, model, tok, got[0], got[1], pf, cfg, fp, rel_sets.get(f.subject), None)
                para_records.append(pr)
                pairs.append(pair_measures(rec, pr))
                n += 1
    times["paraphrases"] = time.perf_counter() - t

    # item 6
    t = time.perf_counter()
    hops = two_hop(adapter, model, tok, records, facts, cfg, fp, opt.max_chains, log) if opt.two_hop else None
    times["two_hop"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    summary = {
        "format": FORMAT, "model": str(getattr(model, "name_or_path", "")), "model_fingerprint": fp,
        "dataset": dataset_name, "n_layers": L, "n_heads": adapter.n_heads, "config": cfg.__dict__.copy(),
        "facts_scanned": len(primaries), "facts_known": len(kept), "related_source": source,
        "related_facts": sum(bool(rel_sets.get(f.subject)) for f, _tp, _c in kept),
        "projection": cfg.projection,
        "flow": flow_summary(records, L) if records else None,
        "enrichment": enrichment_summary(records),
        "extraction": extraction_summary(records, L) if records else None,
        "early_mlp": early_mlp_summary(records, L),
        "paraphrase": paraphrase_summary(pairs, records, para_records) if opt.paraphrases > 0 else None,
        "two_hop": None if hops is None else {k: v for k, v in hops.items() if k != "chains"},
        "seconds": {k: round(v, 2) for k, v in times.items()},
    }
    summary["table"] = table_rows(summary)
    study = Study(summary, records, pairs, [] if hops is None else hops["chains"])
    if out is not None:
        write_study(Path(out), study, texts if source == "model" else None)
    return study


# ---- table -------------------------------------------------------------------------------------

def _layer(x) -> str:
    return "none" if x is None else f"L{x}"


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{100 * x:.0f}%" if pct else f"{x:.3g}"
    return str(x)


def table_rows(s: dict) -> list[dict]:
    """The side-by-side rows: measure, paper (GPT-2 XL, GPT-J), this model, n."""
    rows = []

    def add(key, label, value, n):
        gpt2, gptj = PAPER.get(key, ("", ""))
        rows.append({"key": key, "measure": label, "gpt2_xl": gpt2, "gpt_j": gptj, "this_model": value, "n": n})

    fl, en, ex, em = s["flow"], s["enrichment"], s["extraction"], s["early_mlp"]
    n = s["facts_known"]
    add("knockout_window", "knockout window k", f"{s['config']['knockout_window']} of {s['n_layers']} layers", n)
    if fl:
        fb = fl["first_below"]
        add("subject_first_below_-50", "mean curve first below -20% / -50% (subject)",
            f"{_layer(fb['subject']['-20'])} / {_layer(fb['subject']['-50'])}", n)
        add("relation_first_below", "mean curve first below -20% / -50% (non-subject)",
            f"{_layer(fb['non_subject']['-20'])} / {_layer(fb['non_subject']['-50'])}", n)
        add("last_first_below", "mean curve first below -20% / -50% (last)",
            f"{_layer(fb['last']['-20'])} / {_layer(fb['last']['-50'])}", n)
        rb = fl["relation_before_subject"]
        add("relation_before_subject", "relation before subject, per fact (-20% crossing; argmin)",
            f"{_fmt(rb['-20']['share'], True)} of {rb['-20']['decided']}; {_fmt(rb['argmin']['share'], True)}", n)
    if en:
        ll = en["logit_lens"]
        add("attribute_rate_last_subject_max", "attribute rate, last subject token, max over layers (lens / raw)",
            f"{_fmt(ll['last_subject']['max'])} (L{ll['last_subject']['max_layer']}) / "
            f"{_fmt(en['raw']['last_subject']['max'])}", en["n"])
        others = {p: ll[p]["max"] for p in ("first_subject", "after_subject", "last") if p in ll}
        add("attribute_rate_other_positions_max", "attribute rate, other positions, max (lens)",
            ", ".join(f"{p} {_fmt(v)}" for p, v in others.items()), en["n"])
        if "control_last_subject" in en:
            add("attribute_rate_control", "control: another subject's text, last subject token, max",
                _fmt(en["control_last_subject"]["max"]), en["n"])
    if ex:
        add("mhsa_extraction_share", "facts with an MHSA extraction event (lens / raw)",
            f"{_fmt(ex['logit_lens']['facts_with_event']['attn'], True)} / "
            f"{_fmt(ex['raw']['facts_with_event']['attn'], True)}", ex["n"])
        add("mlp_extraction_share", "facts with an MLP extraction event (lens / raw)",
            f"{_fmt(ex['logit_lens']['facts_with_event']['mlp'], True)} / "
            f"{_fmt(ex['raw']['facts_with_event']['mlp'], True)}", ex["n"])
        add("extraction_head_share", "facts with an extraction head (rank-1 head)",
            _fmt(ex["facts_with_extraction_head"], True), ex["n"])
        ov = ex["ov_check"]
        add("ov_rank_le10_share", "OV check: heads whose OV map ranks the attribute <= 10 (median rank)",
            f"{_fmt(ov['rank_le10_share'], True)} (median {_fmt(ov['median_rank'])})", ov["heads_checked"])
        sr = ex["subject_rank_before_extraction"]
        add("not_top_in_subject_share", "attribute not top-1 / rank > 10 in the subject before the MHSA event",
            f"{_fmt(sr['not_top1_share'], True)} / {_fmt(sr['rank_gt10_share'], True)} "
            f"(median rank {_fmt(sr['median_rank'])})", sr["facts"])
    if em:
        for name, key in (("early", "early_mlp_rate_drop"), ("upper", "upper_mlp_rate_drop")):
            v = em[name]
            win = em[f"{name}_window"]
            if v is None:
                continue
            rate = _fmt(v.get("attribute_rate_drop"))
            add(key, f"{name} MLPs removed at the subject (L{win[0]}-{win[-1]}): rate drop at L{em['read_layer']}; "
                     "mean max MHSA p(attr) change; output p change",
                f"{rate}; {_fmt(v['extraction_change'])}%; {_fmt(v['prob_change'])}%", em["n"])
    pa = s.get("paraphrase")
    if pa and pa.get("pairs"):
        add("paraphrase_head_jaccard",
            "paraphrases: head Jaccard; same subject-knockout window; mean abs. enrichment-peak shift",
            f"{_fmt(pa['head_jaccard']['mean'])}; {_fmt(pa['subject_window_shift']['same_share'], True)}; "
            f"{_fmt(pa['enrichment_peak_shift']['mean_abs'])}", pa["pairs"])
    th = s.get("two_hop")
    if th is not None:
        add("two_hop_two_step_share", "two-hop: composed right / located; two-step flow share",
            f"{th['composed_right']} of {th['hop2_known']} chains; {_fmt(th['two_step_share'], True)}",
            th["located"])
    return rows


def format_table(rows: list[dict], model_label: str = "this model") -> str:
    head = ["measure", "paper GPT-2 XL", "paper GPT-J", model_label, "n"]
    body = [[r["measure"], r["gpt2_xl"], r["gpt_j"], r["this_model"], str(r["n"])] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines)


# ---- outputs -----------------------------------------------------------------------------------

FIGURES = ("knockout_bands.png", "attribute_rate.png", "attribute_rate_raw.png", "extraction_rate.png",
           "early_mlp.png", "two_hop_knockout.png")


def write_study(out: Path, study: Study, descriptions: dict | None) -> list[str]:
    from factedit.plots import attribute_rate_figure, knockout_figure, plt, save_figure

    s = study.summary
    out.mkdir(parents=True, exist_ok=True)
    made = []
    n = s["facts_known"]
    if s["flow"]:
        fl = s["flow"]["curves"]
        knockout_figure({k: fl[k]["mean"] for k in SOURCES}, s["config"]["knockout_window"],
                        out / "knockout_bands.png", title=f"Attention knockout, mean of {n} facts (95% bands)",
                        bands={k: fl[k]["band95"] for k in SOURCES})
        made.append("knockout_bands.png")
    en = s["enrichment"]
    if en:
        for proj, name in (("logit_lens", "attribute_rate.png"), ("raw", "attribute_rate_raw.png")):
            series = {p: en[proj][p]["mean"] for p in POSITIONS if p in en[proj]}
            if proj == "logit_lens" and "control_last_subject" in en:
                series["control (last subject)"] = en["control_last_subject"]["mean"]
            attribute_rate_figure(series, out / name, title=f"Attribute rate ({proj}), {en['n']} facts, "
                                                            f"text: {s['related_source']}")
            made.append(name)
    ex = s["extraction"]
    if ex:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for proj, ls in (("logit_lens", "-"), ("raw", ":")):
            for kind, lab, col in (("attn", "MHSA", "#9467bd"), ("mlp", "MLP", "#d62728")):
                ys = [100 * x for x in ex[proj]["rate_by_layer"][kind]]
                ax.plot(range(len(ys)), ys, ls=ls, marker="o", ms=3, color=col, label=f"{lab} ({proj})")
        ax.set_xlabel("layer")
        ax.set_ylabel("extraction events [% of facts]")
        ax.set_title(f"Attribute at rank 1 of the sublayer's projection, {ex['n']} facts")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save_figure(fig, out / "extraction_rate.png")
        made.append("extraction_rate.png")
    em = s["early_mlp"]
    if em:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        if "attribute_rate_drop" in em["curves"]:
            ax.plot([100 * (y or 0) for y in em["curves"]["attribute_rate_drop"]], marker="o", ms=3,
                    label=f"attribute rate drop at L{em['read_layer']} (x100)", color="#1f77b4")
        ax.plot([y or 0 for y in em["curves"]["extraction_change"]], marker="s", ms=3, color="#9467bd",
                label="change of max MHSA p(attr) [%]")
        ax.axvline(em["read_layer"], color="grey", ls=":", lw=1)
        ax.set_xlabel(f"centre layer of the removed MLP window (w={em['window']})")
        ax.set_title("MLP updates removed at the subject positions")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save_figure(fig, out / "early_mlp.png")
        made.append("early_mlp.png")
    th = s.get("two_hop")
    if th and th.get("knockout"):
        knockout_figure({k: th["knockout"][k]["mean"] for k in ("subject", "non_subject")},
                        s["config"]["knockout_window"], out / "two_hop_knockout.png",
                        title=f"Two-hop queries, mean of {th['located']}",
                        bands={k: th["knockout"][k]["band95"] for k in ("subject", "non_subject")})
        made.append("two_hop_knockout.png")
    s["figures"] = made
    data = {**s, "facts": study.records, "paraphrase_pairs": study.paraphrases, "two_hop_chains": study.chains}
    if descriptions is not None:
        data["descriptions"] = descriptions
    atomic_write_text(out / "study.json", dumps_json(data, indent=1))
    atomic_write_text(out / "table.md", format_table(s["table"]) + "\n")
    return made
