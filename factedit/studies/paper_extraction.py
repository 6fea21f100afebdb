"""Items 3 and 5 of the paper's study (``factedit.studies.paper``): attribute extraction.

Item 3: MHSA and MLP extraction events by layer (both projections), the share of facts with an
extraction head, the heads' OV check, and the attribute's rank in the subject representation
just before the first MHSA extraction event. Item 5: how stable the extraction heads (and the
knockout window and enrichment layers) are across paraphrases of a prompt.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from factedit.analysis.knockout import strongest_layer
from factedit.audit.summary import robustness
from factedit.studies.paper_record import _mean, _share, argmax


def jaccard(a: set, b: set) -> float | None:
    """|a & b| / |a | b|; None when both are empty (counted apart, as the audit does)."""
    if not a and not b:
        return None
    return len(a & b) / len(a | b)


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
