"""Aggregates of an audit's per-fact records (known facts only, as in the paper).

- knockout: mean relative change per source set and centre layer, with a 95% band
  (mean +- 1.96 standard errors);
- attribute rate per layer at the first subject token, the last subject token, the positions
  between the subject and the last token (mean over them), and the last token;
- extraction rate per layer: the share of facts whose MHSA (or MLP) output at the last
  position has the attribute on top of its vocabulary projection;
- knowledge hubs: the extraction heads (rank-1 heads) found most often, overall and per relation;
- enrichment layers per relation: how often each layer's MLP is among the fact's enrichment MLPs;
- robustness: for facts seen through several templates or paraphrases (same ``group``), the
  Jaccard similarity of their extraction-head sets, per relation.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from itertools import combinations

from factedit.analysis.knockout import strongest_layer

SOURCES = ("subject", "non_subject", "last")
POSITIONS = ("first_subject", "last_subject", "after_subject", "last")


def _mean_band(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per column: mean and 1.96 standard errors (0 with fewer than two rows)."""
    n = len(rows)
    means, bands = [], []
    for col in zip(*rows):
        m = sum(col) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in col) / (n - 1)) if n > 1 else 0.0
        means.append(m)
        bands.append(1.96 * sd / math.sqrt(n))
    return means, bands


def _heads(rec: dict) -> set[tuple[int, int]]:
    return {(la, h) for la, h, _p in rec["extraction_heads"]}


def summarise(records: list[dict], n_layers: int, n_heads: int, top: int = 15) -> dict:
    known = [r for r in records if r.get("status") == "known"]
    status = Counter(r.get("status") for r in records)
    relations = sorted({r["relation"] for r in records})
    out: dict = {
        "facts": len(records),
        "known": len(known),
        "unknown": status.get("unknown", 0),
        "errors": status.get("error", 0),
        "known_share": len(known) / len(records) if records else 0.0,
        "per_relation": {rel: {"facts": sum(r["relation"] == rel for r in records),
                               "known": sum(r["relation"] == rel for r in known)} for rel in relations},
        "n_layers": n_layers,
        "n_heads": n_heads,
    }
    if not known:
        return out

    out["knockout"] = {}
    for s in SOURCES:
        mean, band = _mean_band([r["knockout"][s] for r in known])
        out["knockout"][s] = {"mean": mean, "band95": band}
    ko_mean = out["knockout"]["subject"]["mean"]
    out["subject_knockout_strongest_layer"] = strongest_layer(ko_mean)

    rated = [r for r in known if r.get("attribute_rate")]
    out["attribute_rate"] = None
    if rated:
        out["attribute_rate"] = {}
        for pos in POSITIONS:
            rows = [r["attribute_rate"][pos] for r in rated if r["attribute_rate"].get(pos)]
            if rows:
                out["attribute_rate"][pos] = {"mean": _mean_band(rows)[0], "facts": len(rows)}

    out["extraction_rate"] = {
        kind: [sum(r["projection_rank"][kind][la] == 1 for r in known) / len(known) for la in range(n_layers)]
        for kind in ("attn", "mlp")
    }

    freq = [[0.0] * n_heads for _ in range(n_layers)]
    hubs: Counter = Counter()
    by_rel: dict[str, Counter] = defaultdict(Counter)
    for r in known:
        for la, h in _heads(r):
            hubs[(la, h)] += 1
            by_rel[r["relation"]][(la, h)] += 1
            freq[la][h] += 1 / len(known)
    out["head_frequency"] = freq
    out["facts_with_extraction_head"] = sum(bool(r["extraction_heads"]) for r in known) / len(known)
    out["hubs"] = [{"layer": la, "head": h, "facts": n, "share": n / len(known)}
                   for (la, h), n in hubs.most_common(top)]
    out["hubs_per_relation"] = {
        rel: [{"layer": la, "head": h, "facts": n} for (la, h), n in by_rel[rel].most_common(5)] for rel in relations
    }

    enrich: dict[str, list[float]] = {}
    for rel in relations:
        rows = [r for r in known if r["relation"] == rel]
        if rows:
            counts = Counter(la for r in rows for la, _s in r["enrichment_mlps"])
            enrich[rel] = [counts.get(la, 0) / len(rows) for la in range(n_layers)]
    out["enrichment_per_relation"] = enrich

    out["robustness"] = robustness(known)
    return out


def robustness(known: list[dict]) -> dict:
    """Per relation: over groups with two or more known prompts, the mean pairwise Jaccard
    similarity of the extraction-head sets (pairs where both sets are empty are counted apart),
    and the share of groups whose prompts all share their strongest head."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in known:
        groups[(r["relation"], r["group"])].append(r)
    per_rel: dict[str, dict] = {}
    for (rel, _g), rows in sorted(groups.items()):
        if len(rows) < 2:
            continue
        d = per_rel.setdefault(rel, {"groups": 0, "pairs": 0, "both_empty_pairs": 0, "jaccard_sum": 0.0,
                                     "same_top_head": 0})
        d["groups"] += 1
        for a, b in combinations(rows, 2):
            ha, hb = _heads(a), _heads(b)
            if not ha and not hb:
                d["both_empty_pairs"] += 1
                continue
            d["pairs"] += 1
            d["jaccard_sum"] += len(ha & hb) / len(ha | hb)
        tops = {tuple(r["extraction_heads"][0][:2]) if r["extraction_heads"] else None for r in rows}
        d["same_top_head"] += len(tops) == 1 and None not in tops
    result = {}
    for rel, d in per_rel.items():
        result[rel] = {
            "groups": d["groups"],
            "pairs": d["pairs"],
            "both_empty_pairs": d["both_empty_pairs"],
            "mean_jaccard": d["jaccard_sum"] / d["pairs"] if d["pairs"] else None,
            "same_top_head_share": d["same_top_head"] / d["groups"],
        }
    return result
