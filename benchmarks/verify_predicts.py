"""Does `factedit verify`'s flow verdict, computed on the edit prompt alone, predict whether
an edit generalises to prompts verify never saw? (factedit/studies/verify_predicts.py)

    python benchmarks/verify_predicts.py --model smollm2-135m --pool places \
        --pool-relations city_country,region_country --n 200 [--cases 0..99] \
        [--methods circuit] [--set n_prefixes=10 --set steps=15] --json FILE
    python benchmarks/verify_predicts.py --from A.json B.json   # one table from runs split by --cases

For every request and method: locate, edit (single), then on the edited model
- the held-out outcomes: the paraphrases' top-1 (``paraphrases_all``: every paraphrase's top-1
  is the new target's first token) and the portability probes (places pool: each probe's top-1
  is the new country's consequence);
- verify on the edit prompt only (no paraphrases or neighbours, fluency off): its verdict and
  flow signals (check (c)'s share of the gain read from the subject), and p(new) as a signal
  without the flow.
Prints each signal's ROC AUC for each outcome, per method and over all methods, with the 95%
interval and the counts (portability: one row per probe, the edit's signals).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_edit_quality import SINGLE, parse_cases, pool_requests, portability_probes  # noqa: E402

from factedit.analysis.locate import config_for_model, locate  # noqa: E402
from factedit.editing.api import edit_config_for_model  # noqa: E402
from factedit.editing.corpora import resolve_corpus  # noqa: E402
from factedit.editing.edit import compute_edit  # noqa: E402
from factedit.editing.weights import applied  # noqa: E402
from factedit.io import atomic_write_text  # noqa: E402
from factedit.models.fingerprint import model_fingerprint  # noqa: E402
from factedit.models.loading import load_model  # noqa: E402
from factedit.studies.edit_metrics import Fact, still_predicted  # noqa: E402
from factedit.studies.portability import score_probes  # noqa: E402
from factedit.studies.verify_predicts import flow_signals, signal_aucs  # noqa: E402
from factedit.verify.checks import PromptSet, VerifyOptions, verify_edit  # noqa: E402

SIGNALS = ("subject_share", "verdict_pass", "p_new")


def _cases(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(n))
    out = parse_cases(spec)
    if max(out) >= n:
        raise SystemExit(f"--cases: indices below --n ({n})")
    return out


def measure(name: str, cfg, r, model, tok, corpus, lc, probes: list, opts: VerifyOptions) -> dict:
    """One edit: its held-out outcomes and verify's signals on the edit prompt."""
    t0 = time.perf_counter()
    circuit = locate(r.prompt, r.subject, model=model, tokenizer=tok, config=lc)
    res = compute_edit([r], model, tok, corpus, cfg=cfg, circuits=[circuit], mode="single", progress=False)
    edit_s = time.perf_counter() - t0
    with applied(model, res.delta):
        efficacy = still_predicted(model, tok, [Fact(r.filled_prompt, r.target_new)])[0]
        paras = still_predicted(model, tok, [Fact(p, r.target_new) for p in r.paraphrase_prompts])
        ported = score_probes(model, tok, probes)["ported"] if probes else []
    t1 = time.perf_counter()
    report = verify_edit(model, tok, lambda: applied(model, res.delta), r, circuit, res.plans[0], lc, opts,
                         prompts=PromptSet(source="none"))
    return {"method": name, "case_id": r.case_id, "prompt": r.filled_prompt, "target_new": r.target_new,
            "site": res.plans[0].why, "efficacy_top1": efficacy,
            "paraphrases_all": all(paras) if paras else None, "paraphrases_top1": sum(paras),
            "paraphrases_n": len(paras),
            "ported": ported, **flow_signals(report), "edit_s": round(edit_s, 1),
            "verify_s": round(time.perf_counter() - t1, 1)}


def _probe_rows(rows: list[dict]) -> list[dict]:
    """One row per portability probe, with its edit's signals."""
    return [{**{s: r[s] for s in SIGNALS}, "probe_ported": p} for r in rows for p in r["ported"]]


def _fmt(a: dict | None) -> str:
    if a is None:
        return "undefined (one class)"
    return f"{a['auc']:.2f} [{a['ci'][0]:.2f}–{a['ci'][1]:.2f}] ({a['n_success']} / {a['n_failure']})"


def report(rows: list[dict]) -> dict:
    """AUC of each signal for each outcome, per method and over all; printed as a table."""
    out: dict = {}
    groups = {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}
    if len(groups) > 1:
        groups["all methods"] = rows
    print("| method | outcome | edits (probes) | successes | " + " | ".join(f"AUC {s} [95% CI] (succ / fail)"
                                                                    for s in SIGNALS) + " |")
    print("|---|---|---|---|" + "---|" * len(SIGNALS))
    for m, rs in groups.items():
        edited = [r for r in rs if r["efficacy_top1"]]
        for outcome, use, key in (("paraphrases all top-1", edited, "paraphrases_all"),
                                  ("portability probe ported", _probe_rows(edited), "probe_ported")):
            aucs = signal_aucs(use, key, SIGNALS)
            out[f"{m} / {outcome}"] = aucs
            n_ok = sum(1 for r in use if r.get(key))
            print(f"| {m} | {outcome} | {len(use)} | {n_ok} | " + " | ".join(_fmt(aucs[s]) for s in SIGNALS) + " |")
    for m, rs in groups.items():
        passed = [r for r in rs if r["verdict_pass"]]
        print(f"\n{m}: {len(rs)} edits, top-1 efficacy {sum(r['efficacy_top1'] for r in rs)}, verify passes "
              f"{len(passed)}; mean subject share {_mean([r['subject_share'] for r in rs])}; "
              f"edit {_mean([r['edit_s'] for r in rs])} s, verify {_mean([r['verify_s'] for r in rs])} s per edit")
    return out


def _mean(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return f"{sum(xs) / len(xs):.2f} (n {len(xs)})" if xs else "—"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool", default="places")
    ap.add_argument("--pool-relations", default="city_country,region_country")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=None, metavar="A..B,C", help="only these requests (indices below --n)")
    ap.add_argument("--methods", default="circuit", help=f"of {', '.join(SINGLE)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--stats-corpus", nargs="*", default=["sampled"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--from", dest="merge", nargs="+", default=None, metavar="JSON",
                    help="no edits: the table of these runs' rows together")
    args = ap.parse_args()
    if args.merge:
        rows = [r for f in args.merge for r in json.load(open(f))["rows"]]
        report(rows)
        return
    model, tok = load_model(args.model)
    base = edit_config_for_model(model)
    for kv in args.set:
        key, _, val = kv.partition("=")
        base = dataclasses.replace(base, **{key: json.loads(val)})
    chosen = tuple(args.pool_relations.split(",")) if args.pool_relations else None
    _, requests, _, _, _, mine = pool_requests(args.pool, model, tok, args.seed, args.n, chosen)
    probes = portability_probes(mine, model, tok) if args.pool == "places" else {}
    corpus = resolve_corpus(model, tok, None, args.stats_corpus, model_fingerprint(model), base.stats_samples,
                            log=print)
    lc = config_for_model(model)
    opts = VerifyOptions(fluency=False, allow_missing=("paraphrases", "neighbours"))
    rows: list[dict] = []
    for name in args.methods.split(","):
        cfg = dataclasses.replace(base, **SINGLE[name])
        for i in _cases(args.cases, len(requests)):
            r = requests[i]
            rows.append(measure(name, cfg, r, model, tok, corpus, lc, probes.get(r.case_id, []), opts))
            x = rows[-1]
            print(f"  {name} {i}: {x['prompt']!r} -> {x['target_new']!r}: top-1 {x['efficacy_top1']}, paraphrases "
                  f"{x['paraphrases_top1']}/{x['paraphrases_n']}, ported {sum(x['ported'])}/{len(x['ported'])}; "
                  f"verify {x['verdict']}, subject share {x['subject_share']}, {x['edit_s']} + {x['verify_s']} s",
                  flush=True)
            if args.json:
                atomic_write_text(args.json, json.dumps(
                    {"model": args.model, "pool": args.pool, "pool_relations": args.pool_relations,
                     "seed": args.seed, "settings": args.set, "cases": args.cases, "rows": rows}, indent=1))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"model {args.model}; corpus {corpus.name}")
    report(rows)


if __name__ == "__main__":
    main()
