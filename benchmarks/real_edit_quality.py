"""Edit quality on a real model, CounterFact-style requests built from its known facts
(factedit/studies/known_edits.py), every method run by the same code on the same requests.

    python benchmarks/real_edit_quality.py --model smollm2-135m [--n 30] [--seed 0]
        [--methods circuit,mlp] [--mode single|batch] [--stats-corpus sampled|pydoc|FILES]

Prints one row per method: ES, PS, NS, S (CounterFact's probability comparison), top-1
efficacy, and seconds per edit; the unedited model's row first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from factedit.editing.api import edit_config_for_model
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import compute_edit
from factedit.editing.weights import applied
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.studies.known_edits import build_requests, known_facts, score_requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="circuit,mlp")
    ap.add_argument("--mode", default="single", choices=("single", "batch"))
    ap.add_argument("--stats-corpus", nargs="*", default=["sampled"])
    ap.add_argument("--stats-samples", type=int, default=None, help="override the recipe's stats_samples")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    base = edit_config_for_model(model)
    if args.stats_samples:
        base = dataclasses.replace(base, stats_samples=args.stats_samples)
    facts = known_facts(model, tok)
    requests = build_requests(facts, tok, args.n, seed=args.seed)
    corpus = resolve_corpus(model, tok, None, args.stats_corpus, model_fingerprint(model), base.stats_samples,
                            log=print)
    print(f"{args.model}: {len(facts)} known facts, {len(requests)} requests (seed {args.seed}), corpus {corpus.name}",
          flush=True)
    rows = [{"method": "none (unedited)", **score_requests(model, tok, requests), "s_per_edit": 0.0}]
    print(rows[-1], flush=True)
    for method in args.methods.split(","):
        cfg = dataclasses.replace(base, method=method)
        t0 = time.perf_counter()
        if args.mode == "batch":
            res = compute_edit(requests, model, tok, corpus, cfg=cfg, mode="batch", progress=False)
            with applied(model, res.delta):
                m = score_requests(model, tok, requests)
        else:
            acc: dict[str, float] = {}
            for r in requests:
                res = compute_edit([r], model, tok, corpus, cfg=cfg, progress=False)
                with applied(model, res.delta):
                    for k, v in score_requests(model, tok, [r]).items():
                        acc[k] = acc.get(k, 0.0) + v / len(requests)
            m = acc
            m["S"] = 3 / sum(1 / max(m[k], 1e-9) for k in ("ES", "PS", "NS"))
        rows.append({"method": f"{method} ({args.mode})", **m,
                     "s_per_edit": round((time.perf_counter() - t0) / len(requests), 2)})
        print(rows[-1], flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"model {args.model}; corpus {corpus.name}")
    print("| method | n | ES | PS | NS | S | top-1 | s / edit |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {len(requests)} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {r['S']:.1f} | "
              f"{r['top1']:.1f} | {r['s_per_edit']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
