"""One known fact's record for the paper's study (``factedit.studies.paper``): the facts the
study takes, whether the model knows each, and the measures of every finding on one prompt
(its recall circuit from ``factedit.analysis.locate``, the raw-unembedding attribute rate and
extraction events, the control attribute rate, the attribute's rank in the subject before
extraction). The aggregates over records (``paper_flow``, ``paper_enrichment``,
``paper_extraction``) share the small helpers here.
"""

from __future__ import annotations

import torch

from factedit.analysis.attribute_rate import attribute_rate
from factedit.analysis.circuit import LocateConfig
from factedit.analysis.locate import check_length, locate
from factedit.analysis.projection import components, rank_and_prob
from factedit.analysis.rerun import clean_run
from factedit.analysis.spans import target_token_ids, tokenize_with_subject
from factedit.audit.dataset import AuditFact, template_of
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout

SOURCES = ("subject", "non_subject", "last")
POSITIONS = ("first_subject", "last_subject", "after_subject", "last")


# ---- small pure helpers -----------------------------------------------------------------------

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
def known_prompt(adapter: ModelLayout, tok, prompt: str, subject: str, attribute: str):
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


# ---- one fact ----------------------------------------------------------------------------------

def _r(x: float) -> float:
    return round(float(x), 6)


def _rs(xs) -> list | None:
    return None if xs is None else [_r(x) for x in xs]


@torch.no_grad()
def fact_record(adapter: ModelLayout, model, tok, tp, clean, fact: AuditFact, cfg: LocateConfig, fp: str,
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
