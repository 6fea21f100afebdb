"""One table from runs of ``real_edit_quality.py`` that split the same single edits by ``--cases``
(run side by side, one per core): every method's per-edit rows pooled, its scores and
intervals computed again as one run computes them.

    python benchmarks/merge_cases.py A.json B.json [--json MERGED.json]

The runs must share model, pool, seed, settings and retention facts (checked). The unedited
row is pooled from each run's own: means weighted by n, proportions by their counts. With
``--same-requests`` every method keeps, in each run, only the edits that every method of that
run finished (runs cut short: the methods run one after another over the same requests in
the same order).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_edit_quality import _mean_rows, _table  # noqa: E402

from factedit.studies.edit_metrics import EditProbe, proportion  # noqa: E402

SAME = ("model", "pool", "pool_relations", "seed", "settings", "corpus", "retention_facts", "perplexity_text")
MEANS = ("ES", "PS", "NS", "S", "top1", "fluency")
# per-request facts (pooled over the runs); retention and perplexity are the same facts and text in every run
PROPORTIONS = ("relation_true", "relation_new", "portability", "portability_moved", "subject_specificity")


def _pool_unedited(rows: list[dict]) -> dict:
    n = sum(r["n"] for r in rows)
    out = {"method": rows[0]["method"], "n": n, "s_per_edit": 0.0}
    out.update({k: sum(r[k] * r["n"] for r in rows) / n for k in MEANS})
    for k in PROPORTIONS:
        parts = [r[k] for r in rows if r.get(k)]
        out[k] = proportion(sum(p["k"] for p in parts), sum(p["n"] for p in parts)) if parts else None
    out["retention"], out["perplexity"] = rows[0].get("retention"), rows[0].get("perplexity")
    return out


def _name(row: dict) -> str:
    return row["method"].split(",")[0].removesuffix(" running").removesuffix(",")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json", default=None)
    ap.add_argument("--same-requests", action="store_true",
                    help="per run, only the first k edits of every method, k the fewest any method finished")
    args = ap.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    for key in SAME:
        if any(r.get(key) != runs[0].get(key) for r in runs):
            raise SystemExit(f"the runs differ in {key!r}: they are not parts of one run")
    if any(r.get("partial") for r in runs):
        print("note: a run is partial (still running or cut short): its finished edits are pooled", flush=True)
    cases = [c for r in runs for c in (r.get("cases") or [])]
    if len(set(cases)) != len(cases):
        raise SystemExit("the runs share cases: each edit must be counted once")
    before = next((r["rows"][0].get("perplexity") or {}).get("before") for r in runs)
    probe = EditProbe({}, [None] * len(runs[0]["retention_facts"]), [], before)
    methods = list(dict.fromkeys(_name(row) for r in runs for row in r["rows"]))
    if args.same_requests:
        for r in runs:
            edited = [row for row in r["rows"] if not _name(row).startswith("none")]
            if any(row.get("refused") for row in edited):
                raise SystemExit("--same-requests: a method refused edits, so its rows are not in the others' order")
            k = min(len(row.get("per_request", [])) for row in edited)
            for row in edited:
                row["per_request"] = row["per_request"][:k]
                row["n"] = k
    merged = []
    for name in methods:
        rows = [row for r in runs for row in r["rows"] if _name(row) == name]
        if name.startswith("none"):
            merged.append(_pool_unedited(rows))
            continue
        per = [p for row in rows for p in row.get("per_request", [])]
        if not per:
            continue
        seconds = sum(row["s_per_edit"] * row["n"] for row in rows)
        merged.append({"method": name, "n": len(per), **_mean_rows(per, probe),
                       "s_per_edit": round(seconds / len(per), 2)})
    _table(merged)
    if args.json:
        Path(args.json).write_text(json.dumps({**{k: runs[0].get(k) for k in SAME if k != "retention_facts"},
                                               "runs": args.runs, "cases": sorted(cases), "rows": merged},
                                              indent=1))


if __name__ == "__main__":
    main()
