"""Edit quality on a real model, CounterFact-style requests built from its known facts
(factedit/studies/known_edits.py), every method run by the same code on the same requests.

    python benchmarks/real_edit_quality.py --model smollm2-135m [--n 100] [--seed 0] [--pool known_1000]
        [--methods circuit,rome,mlp,heads,lora,ft] [--batch 0] [--batch-methods circuit,memit]
        [--set KEY=JSON ...] [--stats-corpus sampled|pydoc|FILES] [--json FILE]
        [--fit-cache DIR] [--sequential N [--sequence-dir DIR --sequence-chunk 10]]

Methods (each from the model's recipe, ``edit:`` section, with the overrides below):
- ``circuit``: factedit's edit of the fact's located circuit (MLP at the subject + extraction heads);
- ``rome``: ROME as its authors set it up: one rank-one MLP update at the layer causal tracing
  selects on average (the recipe's ``mlp_layers``), ROME's value-fitting settings, the value
  inserted for the mean of the contexts' keys (``insert_keys: mean``, whatever ``--set`` says);
- ``mlp``: the same MLP-only edit with the settings as given (``insert_keys`` included);
- ``heads``: the extraction heads' value update alone;
- ``lora``: plain LoRA fine-tuning of the bare prompt (peft; no context prefixes, as
  EasyEdit's LoRA baseline), rank ``lora_rank`` on every MLP's output projection
  (``mlp_layers`` unset), as a user fine-tunes without a located site;
- ``ft``: FT-L, constrained fine-tuning of the MLP output weight at the traced layer (the
  recipe's ``mlp_layers``), Adam 25 steps at 5e-4, change clipped to ±5e-4 (ROME's baseline).
With ``--batch N`` one batch of N requests per batch method: ``circuit`` (the circuit's
positions, the recipe's batch settings, e.g. ``batch_insert_keys``) and ``memit`` (method mlp
over the recipe's ``batch_layers``, one mean key per request and one pass as MEMIT). A batch method whose
value fit is the one before it (same top layer, position and fit settings) reuses it
(``compute_edit(reuse_fit=...)``): its seconds per edit then exclude the fit (``fit_shared``).

``--pool places [--pool-relations A,B]`` takes the requests from a named request pool (docs/pools.md: pairwise-disjoint
subjects, none of them another's neighbour, whatever ``--neighbours`` says; SF from each
record's other known facts); the default, known_1000, builds them here as before.

Each fact's circuit is located once (recipe analysis settings) and shared by the methods that
read it; its time is reported separately. Prints one row per method (ES, PS, NS, S by
CounterFact's probability comparison, top-1 efficacy, fluency, SF: the subject's other facts
kept, seconds per edit), the unedited model's row first, then a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from factedit.analysis.locate import config_for_model, locate
from factedit.editing.api import edit_config_for_model
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import compute_edit
from factedit.editing.requests import RequestError
from factedit.editing.weights import WeightDelta, applied
from factedit.errors import FactEditError
from factedit.io import atomic_write_text
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.studies.known_edits import (
    KnownFact,
    build_requests,
    harmonic_s,
    known_facts,
    score_requests,
    subject_facts,
)
from factedit.studies.pools import build_pool

SINGLE = {"circuit": {"method": "circuit"}, "rome": {"method": "mlp", "insert_keys": "mean"},
          "mlp": {"method": "mlp"}, "heads": {"method": "heads"},
          "lora": {"method": "lora", "mlp_layers": None, "n_prefixes": 0}, "ft": {"method": "ft"}}
BATCH = {"circuit": {"method": "circuit"}, "memit": {"method": "mlp", "batch_insert_keys": "mean",
                                                        "batch_passes": 1},
         "lora": {"method": "lora", "mlp_layers": None, "n_prefixes": 0}}  # the bare prompts, as single


def _mean_rows(rows: list[dict]) -> dict:
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("ES", "PS", "NS", "top1", "fluency")}
    sf = [(r["SF"], r["n_SF"]) for r in rows if r.get("n_SF")]
    n_sf = sum(n for _, n in sf)
    out["SF"] = sum(s * n for s, n in sf) / n_sf if n_sf else None
    out["n_SF"] = n_sf
    out["S"] = harmonic_s(out)
    return out


def pool_requests(name: str, model, tok, seed: int, n: int,
                  relations: tuple[str, ...] | None = None) -> tuple[int, list, dict]:
    """The known facts among those the pool scanned to build its first ``n`` requests (all of
    them where the pool is cached), the requests, and their subjects' other known facts, for SF."""
    built = build_pool(name, model, tok, seed=seed, limit=n, log=lambda m: print(m, flush=True), relations=relations)
    requests = [p.request for p in built.requests]
    others = {p.request.case_id: [KnownFact(f["prompt"], f["prompt"].replace(p.request.subject, "{}", 1),
                                            p.request.subject, f["attribute"], f["relation"]) for f in p.other_facts]
              for p in built.requests}
    return sum(built.stats.get("known", {}).values()), requests, others


def sequence_in_folder(seq: list, model, tok, cfg, stats_corpus: list[str], folder: str,
                       chunk: int) -> tuple[WeightDelta, list[dict]]:
    """Edit ``seq`` one after another through ``folder`` as a user continues a sequence
    (``factedit.edit(..., append=True)``), ``chunk`` requests per call, each call locating its
    facts on the model edited so far. Resumes from the edits the folder already holds (they
    must be the first of ``seq``); each call's seconds go to ``<folder>.timings.json``.
    Returns the sequence's composed update and the timings."""
    from factedit.editing.api import edit
    from factedit.editing.history import load_sequence

    out, timings_file = Path(folder), Path(f"{folder}.timings.json")
    done, timings = 0, []
    if (out / "edits.json").exists():
        held = [(r["prompt"], r["subject"], r["target_new"]) for r in load_sequence(out).manifest["requests"]]
        done = len(held)
        if held != [(r.prompt, r.subject, r.target_new) for r in seq[:done]]:
            raise SystemExit(f"{out} holds another sequence than these requests' first {done}: give a new folder")
        timings = json.loads(timings_file.read_text()) if timings_file.exists() else []
        print(f"resuming the sequence in {out} after {done} edits", flush=True)
    while done < len(seq):
        part = seq[done : done + chunk]
        t = time.perf_counter()
        edit(part, model=model, tokenizer=tok, config=cfg, mode="sequential", stats_corpus=stats_corpus,
             out=out, append=done > 0, progress=False)
        timings.append({"first": done, "n": len(part), "seconds": round(time.perf_counter() - t, 2)})
        atomic_write_text(timings_file, json.dumps(timings, indent=1))
        done += len(part)
        print(f"  sequence: {done}/{len(seq)} edits, {timings[-1]['seconds'] / len(part):.1f} s / edit", flush=True)
    return load_sequence(out).delta(), timings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=100, help="single edits per method (0: none)")
    ap.add_argument("--batch", type=int, default=0, help="requests in the one batch per batch method (0: none)")
    ap.add_argument("--sequential", type=int, default=0,
                    help="requests edited one after another (circuit, the recipe's sequential_strategy; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="circuit,rome,lora")
    ap.add_argument("--batch-methods", default="circuit,memit")
    ap.add_argument("--batch-lambdas", default=None, metavar="L1,L2,...",
                    help="run every batch method once per λ (batch_lambda; MEMIT's mom2_update_weight), all on "
                         "one shared value fit; default: the recipe's")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override an edit setting for every method, e.g. --set 'mlp_layers=[4]'")
    ap.add_argument("--stats-corpus", nargs="*", default=["sampled"])
    ap.add_argument("--cases", default=None, metavar="I,J,...",
                    help="single edits of these requests only (indices among the first --n), to re-measure the "
                         "requests a change affects; with --batch 0 and --sequential 0")
    ap.add_argument("--fit-cache", default=None, metavar="DIR",
                    help="keep every value fit on the unedited model in DIR (chunk by chunk) and reuse what "
                         "is there: a stopped batch resumes its fit, a λ study refits nothing")
    ap.add_argument("--sequence-dir", default=None, metavar="DIR",
                    help="with --sequential: edit through DIR as `factedit edit --append` does, "
                         "--sequence-chunk requests at a time, each chunk located on the model edited so far; "
                         "a run that stops resumes from the edits DIR holds")
    ap.add_argument("--sequence-chunk", type=int, default=10)
    ap.add_argument("--neighbours", choices=("auto", "disjoint", "all"), default="auto",
                    help="disjoint: no request's subject is another's neighbour (needed when edits are applied "
                         "together, else NS scores neighbours the batch rewrote itself); all: every other known "
                         "subject with the attribute (CounterFact's rule, for single edits); auto: disjoint with "
                         "--batch or --sequential")
    ap.add_argument("--pool", default="known_1000",
                    help="the requests' source: known_1000 (built here, as before) or a named pool (factedit pools "
                         "list; places: real facts the model knows); insertion has no true target to score")
    ap.add_argument("--pool-relations", default=None, metavar="A,B",
                    help="with --pool places: only these relations (e.g. without the continents, which a model "
                         "may answer by default; docs/pools.md)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases = [int(x) for x in args.cases.split(",")] if args.cases else None
    if cases and (args.batch or args.sequential or max(cases) >= args.n):
        ap.error("--cases: indices below --n, single edits only")
    model, tok = load_model(args.model)
    base = edit_config_for_model(model)
    for kv in args.set:
        key, _, val = kv.partition("=")
        base = dataclasses.replace(base, **{key: json.loads(val)})
    wanted = max(args.n, args.batch, args.sequential)
    if args.pool == "known_1000":
        facts = known_facts(model, tok)
        n_known = len(facts)
        disjoint = args.neighbours == "disjoint" or (args.neighbours == "auto" and bool(args.batch or args.sequential))
        requests = build_requests(facts, tok, wanted, seed=args.seed, disjoint=disjoint)
        others = subject_facts(facts, requests)
    else:
        if args.pool == "insertion":
            ap.error("--pool insertion: its requests have no true target, which ES / PS / NS compare against")
        chosen = tuple(args.pool_relations.split(",")) if args.pool_relations else None
        n_known, requests, others = pool_requests(args.pool, model, tok, args.seed, wanted, chosen)
        disjoint = True
    if max(args.batch, args.sequential) > len(requests):
        ap.error(f"{max(args.batch, args.sequential)} requests asked for, {len(requests)} can be built "
                 f"({'disjoint ' if disjoint else ''}neighbours, seed {args.seed})")
    fp = model_fingerprint(model)
    corpus = resolve_corpus(model, tok, None, args.stats_corpus, fp, base.stats_samples, log=print)
    scanned = "" if args.pool == "known_1000" else " scanned"
    print(f"{args.model}: {args.pool}, {n_known} known facts{scanned}, {len(requests)} requests (seed {args.seed}, "
          f"{'disjoint' if disjoint else 'all'} neighbours), corpus "
          f"{corpus.name}, settings {args.set or 'recipe'}", flush=True)
    single = requests[: args.n]
    if cases:
        single = requests = [single[i] for i in cases]
    lc = config_for_model(model)
    lc.trace = lc.trace or base.mlp_site == "trace"
    methods = [m for m in args.methods.split(",") if m and args.n]
    batch_methods = [m for m in args.batch_methods.split(",") if m and args.batch]
    # a site depends on the circuit for the circuit and heads methods, and for the MLP methods
    # when the recipe leaves them more than one candidate layer (or asks for the traced one)
    site_free = (not {"circuit", "heads"} & {*methods, *batch_methods}
                 and (not args.sequential or args.sequence_dir is not None)
                 and len(base.mlp_layers or []) == 1 and base.mlp_site != "trace")
    t0 = time.perf_counter()
    circuits = [None if site_free else
                locate(r.prompt, r.subject, model=model, tokenizer=tok, config=lc, fingerprint=fp) for r in requests]
    locate_s = (time.perf_counter() - t0) / max(1, len(requests))
    print("not located: these methods' sites do not depend on the circuit" if site_free else
          f"located {len(circuits)} circuits, {locate_s:.1f} s each", flush=True)

    def save(rows: list[dict], partial: bool) -> None:
        """The JSON so far (``partial``: a method's row still running), rewritten atomically
        after every edit, so that a run cut short keeps what it measured."""
        if args.json:
            atomic_write_text(args.json, json.dumps(
                {"model": args.model, "pool": args.pool, "pool_relations": args.pool_relations, "seed": args.seed,
                 "settings": args.set, "cases": cases,
                 "neighbours": "disjoint" if disjoint else "all",
                 "corpus": corpus.name, "locate_s": locate_s, "partial": partial, "rows": rows}, indent=1))

    unedited = single or requests  # the single edits' requests, else the batch's or sequence's
    rows = [{"method": "none (unedited)", "n": len(unedited),
             **score_requests(model, tok, unedited, fluency=True, others=others), "s_per_edit": 0.0}]
    print(rows[-1], flush=True)
    save(rows, True)
    for name in methods:
        cfg = dataclasses.replace(base, **SINGLE[name])
        per, seconds, sites = [], 0.0, []
        refused = []
        for r, c in zip(single, circuits):
            try:
                res = compute_edit([r], model, tok, corpus, cfg=cfg, circuits=[c], mode="single", progress=False,
                                   fit_cache=args.fit_cache)
            except RequestError as exc:  # e.g. a lookup edit of a multi-token target: not scored, counted
                refused.append(f"{r.filled_prompt!r} -> {r.target_new!r}: {exc}")
                print(f"{name}: refused {refused[-1]}", flush=True)
                continue
            seconds += res.seconds
            sites.append(res.plans[0].why)
            with applied(model, res.delta):
                per.append(score_requests(model, tok, [r], fluency=True, others=others))
            per[-1]["fit_nll"] = res.nll[0] if res.nll else None  # target NLL: before, after the fit
            print(f"  {name} {len(per)}/{len(single)}: {r.filled_prompt!r} -> {r.target_new!r}: ES {per[-1]['ES']:.0f} "
                  f"PS {per[-1]['PS']:.0f} NS {per[-1]['NS']:.0f}, {res.seconds:.0f} s; {sites[-1]}", flush=True)
            save(rows + [{"method": f"{name} (single), running", "n": len(per), **_mean_rows(per),
                          "s_per_edit": round(seconds / len(per), 2), "sites": sites, "per_request": per}], True)
        rows.append({"method": f"{name} (single)" + (f", {len(refused)} refused" if refused else ""),
                     "n": len(per), **_mean_rows(per), "s_per_edit": round(seconds / max(1, len(per)), 2),
                     "sites": sites, "per_request": per, "refused": refused})
        print({k: v for k, v in rows[-1].items() if k not in ("sites", "per_request")}, flush=True)
        save(rows, True)
    batch = requests[: args.batch]
    fitted = None  # a batch spread's fit, shared by the next batch method where its site and settings match
    lambdas = [float(x) for x in args.batch_lambdas.split(",")] if args.batch_lambdas else [None]
    for name, lam in [(m, lam) for lam in lambdas for m in batch_methods]:
        cfg = dataclasses.replace(base, **BATCH[name])
        if lam is not None:
            cfg = dataclasses.replace(cfg, batch_lambda=lam)
        try:
            res = compute_edit(batch, model, tok, corpus, cfg=cfg, circuits=circuits[: len(batch)], mode="batch",
                               progress=False, reuse_fit=fitted, fit_cache=args.fit_cache)
        except FactEditError as exc:
            if fitted is None or "reuse_fit" not in str(exc):
                raise
            print(f"{name}: its own value fit ({exc})", flush=True)
            res = compute_edit(batch, model, tok, corpus, cfg=cfg, circuits=circuits[: len(batch)], mode="batch",
                               progress=False, fit_cache=args.fit_cache)
        shared = fitted is not None and res.fit is fitted.fit
        fitted = fitted or (res if res.fit is not None else None)
        with applied(model, res.delta):
            m = score_requests(model, tok, batch, fluency=True, others=others)
        label = f"{name} (batch of {len(batch)}" + (f", λ {lam:g})" if lam is not None else ")")
        rows.append({"method": label, "n": len(batch), **m, "batch_lambda": cfg.batch_lambda,
                     "update_norms": res.delta.norms(),
                     "s_per_edit": round(res.seconds / len(batch), 2), "fit_shared": shared,
                     "sites": [res.plans[0].why]})
        print({k: v for k, v in rows[-1].items() if k != "sites"}, flush=True)
        save(rows, True)
    if args.sequential and args.sequence_dir:  # through a folder, resumable
        seq = requests[: args.sequential]
        delta, timings = sequence_in_folder(seq, model, tok, base, args.stats_corpus, args.sequence_dir,
                                            args.sequence_chunk)
        with applied(model, delta):
            m = score_requests(model, tok, seq, fluency=True, others=others)
        first, last = timings[0], timings[-1]
        rows.append({"method": f"circuit (sequential via --append, {base.sequential_strategy})", "n": len(seq), **m,
                     "s_per_edit": round(sum(t["seconds"] for t in timings) / len(seq), 2),
                     "s_per_edit_first_chunk": round(first["seconds"] / first["n"], 2),
                     "s_per_edit_last_chunk": round(last["seconds"] / last["n"], 2), "chunks": timings})
        print({k: v for k, v in rows[-1].items() if k != "chunks"}, flush=True)
    elif args.sequential:  # one after another, scored once at the end
        seq = requests[: args.sequential]
        res = compute_edit(seq, model, tok, corpus, cfg=base, circuits=circuits[: len(seq)], mode="sequential",
                           progress=False)
        with applied(model, res.delta):
            m = score_requests(model, tok, seq, fluency=True, others=others)
        rows.append({"method": f"circuit (sequential, {base.sequential_strategy})", "n": len(seq), **m,
                     "s_per_edit": round(res.seconds / len(seq), 2), "sites": [p.why for p in res.plans]})
        print({k: v for k, v in rows[-1].items() if k != "sites"}, flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"model {args.model}; corpus {corpus.name}; locate {locate_s:.1f} s per fact (not in s / edit)")
    print("| method | n | ES | PS | NS | S | top-1 | fluency | SF (n) | s / edit |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sf = "—" if r.get("SF") is None else f"{r['SF']:.0f} ({r['n_SF']})"
        print(f"| {r['method']} | {r['n']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {r['S']:.1f} | "
              f"{r['top1']:.1f} | {r['fluency']:.2f} | {sf} | {r['s_per_edit']} |")
    save(rows, partial=False)


if __name__ == "__main__":
    main()
