"""Edit quality on a real model, CounterFact-style requests built from its known facts
(factedit/studies/known_edits.py), every method run by the same code on the same requests.

    python benchmarks/real_edit_quality.py --model smollm2-135m [--n 100] [--seed 0] [--pool known_1000]
        [--methods circuit,rome,mlp,heads,lora,ft] [--batch 0] [--batch-methods circuit,memit]
        [--set KEY=JSON ...] [--stats-corpus sampled|pydoc|FILES] [--json FILE]
        [--fit-cache DIR] [--sequential N [--sequence-dir DIR --sequence-chunk 10]]
        [--retention 200] [--single-retention 50] [--no-perplexity] [--single-perplexity 10]

Methods (each from the model's recipe, ``edit:`` section, with the overrides below):
- ``circuit``: factedit's edit of the fact's located circuit (MLP at the subject + extraction heads);
- ``circuit-subject`` / ``circuit-relation``: the same with ``site.scope`` subject (the
  subject's MLP only) / relation (the last position's MLP just after the subject is read);
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
CounterFact's probability comparison, top-1 efficacy, fluency, then what the edit keeps, each
with its n and 95% interval, seconds per edit), the unedited model's row first, then a
Markdown table. What is kept (factedit/studies/edit_metrics.py; a fact is "kept" when the
model's top-1 next token is still its attribute's first token):
- SF, subject specificity: the edited subjects' other known facts;
- RS true / RS new, relation specificity: the hard neighbours (other subjects of the edited
  relation whose attribute is the old / the new target; known_1000: its known facts so) apart
  from NS's neighbours;
- portability (places pool): the edited city's or region's continent, official language and
  currency asked through the edited link (factedit/studies/portability.py), kept where the
  unedited model answers them for the original country; "portability" when the top-1 is the
  new country's, "moved" when the new one beats the old by mean token NLL;
- retention: ``--retention N`` (200) known facts of subjects no request edits, fixed by the seed
  (places: the main, other and hard-neighbour facts of the pool's next N requests and of the
  requests' held-out neighbours; known_1000: its known facts), after the whole batch or
  sequence; for a sequence also after every tenth of it (``retention_curve``); for single
  edits the mean over edits of the share kept of the first ``--single-retention`` (50) of them;
- perplexity on fixed held-out English text (factedit/data/heldout_text.json, about 1,900
  tokens), before and after, and its rise in %: after the whole batch or sequence; for single
  edits the mean rise over the first ``--single-perplexity`` (10) edits; ``--no-perplexity``
  skips it.
Intervals: Wilson for the shares of facts (pooled over the edits for single edits), normal
(mean ± 1.96 sd / √n) for means over single edits (retention, perplexity rise).
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
from factedit.studies.edit_metrics import (
    EditProbe,
    Fact,
    cell,
    checkpoints,
    hard_neighbours_of,
    kept,
    pick_retention,
    ppl_cell,
    prefix_delta,
    subject_specificity,
)
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
          "circuit-subject": {"method": "circuit", "scope": "subject"},
          "circuit-relation": {"method": "circuit", "scope": "relation"},
          "mlp": {"method": "mlp"}, "heads": {"method": "heads"},
          "lora": {"method": "lora", "mlp_layers": None, "n_prefixes": 0}, "ft": {"method": "ft"}}
BATCH = {"circuit": {"method": "circuit"}, "memit": {"method": "mlp", "batch_insert_keys": "mean",
                                                        "batch_passes": 1},
         "lora": {"method": "lora", "mlp_layers": None, "n_prefixes": 0}}  # the bare prompts, as single


def parse_cases(spec: str) -> list[int]:
    """``--cases``: indices and inclusive ranges, e.g. ``0..99`` or ``3,7,10..12``."""
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("..")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def _mean_rows(rows: list[dict], probe: EditProbe) -> dict:
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("ES", "PS", "NS", "top1", "fluency")}
    sf = [(r["SF"], r["n_SF"]) for r in rows if r.get("n_SF")]
    n_sf = sum(n for _, n in sf)
    out["SF"] = sum(s * n for s, n in sf) / n_sf if n_sf else None
    out["n_SF"] = n_sf
    out["k_SF"] = sum(r.get("k_SF", 0) for r in rows)
    out["S"] = harmonic_s(out)
    out["subject_specificity"] = subject_specificity(out)
    return {**out, **probe.pooled(rows)}


def pool_requests(name: str, model, tok, seed: int, n: int, relations: tuple[str, ...] | None = None,
                  extra: int = 0) -> tuple[int, list, dict, dict, list[Fact], list]:
    """The known facts among those the pool scanned to build its first ``n + extra`` requests
    (all of them where the pool is cached), the first ``n`` requests, their subjects' other known facts (for SF),
    their hard neighbours (by case id) and the candidate retention facts: the known facts of the
    pool's next ``extra`` requests (main, other and hard-neighbour facts) and the requests'
    hard neighbours."""
    built = build_pool(name, model, tok, seed=seed, limit=n + extra, log=lambda m: print(m, flush=True),
                       relations=relations)
    mine, more = built.requests[:n], built.requests[n:]
    requests = [p.request for p in mine]
    others = {p.request.case_id: [KnownFact(f["prompt"], f["prompt"].replace(p.request.subject, "{}", 1),
                                            p.request.subject, f["attribute"], f["relation"]) for f in p.other_facts]
              for p in mine}
    hard = {p.request.case_id: p.hard_neighbours for p in mine}
    candidates = [Fact(p.request.filled_prompt, p.request.target_true, p.request.subject, p.relation) for p in more]
    candidates += [Fact(f["prompt"], f["attribute"], p.request.subject, f["relation"])
                   for p in more for f in p.other_facts]
    candidates += [Fact(h["prompt"], h["attribute"], h["subject"], p.relation)
                   for p in built.requests for h in p.hard_neighbours]
    return sum(built.stats.get("known", {}).values()), requests, others, hard, candidates, mine


def portability_probes(mine: list, model, tok) -> dict:
    """The requests' portability probes the unedited model answers (factedit/studies/portability.py),
    by case id; none for a request that edits no city's or region's country."""
    from factedit.studies.places import country_table
    from factedit.studies.portability import candidate_probes, known_probes

    probes: dict = {}
    for p in known_probes(model, tok, candidate_probes(mine, country_table(), tok)):
        probes.setdefault(p.case_id, []).append(p)
    return probes


def sequence_in_folder(seq: list, model, tok, cfg, stats_corpus: list[str], folder: str,
                       chunk: int) -> tuple[WeightDelta, list[WeightDelta], list[dict]]:
    """Edit ``seq`` one after another through ``folder`` as a user continues a sequence
    (``factedit.edit(..., append=True)``), ``chunk`` requests per call, each call locating its
    facts on the model edited so far. Resumes from the edits the folder already holds (they
    must be the first of ``seq``); each call's seconds go to ``<folder>.timings.json``.
    Returns the sequence's composed update, its steps and the timings."""
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
    held_seq = load_sequence(out)
    return held_seq.delta(), held_seq.steps, timings


def _parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--cases", default=None, metavar="I,J,A..B",
                    help="single edits of these requests only (indices among the first --n; A..B: A to B "
                         "inclusive), to re-measure the requests a change affects or to split a run across "
                         "processes; with --batch 0 and --sequential 0")
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
    ap.add_argument("--retention", type=int, default=200, metavar="N",
                    help="known facts of unedited subjects scored for retention (fixed by --seed; up to N)")
    ap.add_argument("--single-retention", type=int, default=50, metavar="M",
                    help="single edits: retention on the first M of those facts, per edit")
    ap.add_argument("--no-perplexity", action="store_true", help="no perplexity on the held-out text")
    ap.add_argument("--single-perplexity", type=int, default=10, metavar="K",
                    help="single edits: perplexity after the first K edits of each method (0: none)")
    ap.add_argument("--json", default=None)
    return ap


def _requests(args, ap, model, tok) -> tuple[int, list, dict, bool, dict, list[Fact], dict]:
    """The requests (first ``max(--n, --batch, --sequential)``), what the scores need of them
    (other facts, hard neighbours, portability probes) and the candidate retention facts."""
    wanted = max(args.n, args.batch, args.sequential)
    if args.pool == "known_1000":
        facts = known_facts(model, tok)
        disjoint = args.neighbours == "disjoint" or (args.neighbours == "auto" and bool(args.batch or args.sequential))
        requests = build_requests(facts, tok, wanted, seed=args.seed, disjoint=disjoint)
        others = subject_facts(facts, requests)
        hard = hard_neighbours_of(facts, requests, {r.subject for r in requests})
        candidates = [Fact(f.prompt, f.attribute, f.subject, f.relation) for f in facts]
        return len(facts), requests, others, disjoint, hard, candidates, {}
    if args.pool == "insertion":
        ap.error("--pool insertion: its requests have no true target, which ES / PS / NS compare against")
    chosen = tuple(args.pool_relations.split(",")) if args.pool_relations else None
    n_known, requests, others, hard, candidates, mine = pool_requests(args.pool, model, tok, args.seed, wanted,
                                                                      chosen, extra=args.retention)
    probes = portability_probes(mine, model, tok) if args.pool == "places" else {}
    return n_known, requests, others, True, hard, candidates, probes


def _singles(name: str, cfg, single: list, circuits: list, model, tok, corpus, others: dict, probe: EditProbe,
             args, progress) -> dict:
    """One method's single edits, each scored on the model with it alone; ``progress(row)``
    hears the row so far after every edit."""
    per, seconds, sites, refused = [], 0.0, [], []
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
            per[-1].update(probe.single(model, tok, r, with_perplexity=len(per) <= args.single_perplexity))
        per[-1]["fit_nll"] = res.nll[0] if res.nll else None  # target NLL: before, after the fit
        print(f"  {name} {len(per)}/{len(single)}: {r.filled_prompt!r} -> {r.target_new!r}: ES {per[-1]['ES']:.0f} "
              f"PS {per[-1]['PS']:.0f} NS {per[-1]['NS']:.0f}, {res.seconds:.0f} s; {sites[-1]}", flush=True)
        progress({"method": f"{name} (single), running", "n": len(per), **_mean_rows(per, probe),
                  "s_per_edit": round(seconds / len(per), 2), "sites": sites, "per_request": per})
    return {"method": f"{name} (single)" + (f", {len(refused)} refused" if refused else ""),
            "n": len(per), **(_mean_rows(per, probe) if per else {}),
            "s_per_edit": round(seconds / max(1, len(per)), 2), "sites": sites, "per_request": per, "refused": refused}


def _batches(batch: list, batch_methods: list[str], base, circuits: list, model, tok, corpus, others: dict,
             probe: EditProbe, args, save) -> list[dict]:
    """One batch per batch method (and λ), each scored on the model with it."""
    rows: list[dict] = []
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
            m = _scored(model, tok, batch, others, probe)
        label = f"{name} (batch of {len(batch)}" + (f", λ {lam:g})" if lam is not None else ")")
        rows.append({"method": label, "n": len(batch), **m, "batch_lambda": cfg.batch_lambda,
                     "update_norms": res.delta.norms(),
                     "s_per_edit": round(res.seconds / len(batch), 2), "fit_shared": shared,
                     "sites": [res.plans[0].why]})
        print({k: v for k, v in rows[-1].items() if k != "sites"}, flush=True)
        save(rows)
    return rows


def _scored(model, tok, requests: list, others: dict, probe: EditProbe) -> dict:
    """Every score of the model as it is now on ``requests`` applied together (or none)."""
    m = score_requests(model, tok, requests, fluency=True, others=others)
    return {**m, "subject_specificity": subject_specificity(m), **probe.scores(model, tok, requests)}


def _retention_curve(model, tok, steps: list[WeightDelta], probe: EditProbe) -> list[dict]:
    """Retention after every tenth of a sequence (its first k steps applied)."""
    curve = []
    for k in checkpoints(len(steps)):
        with applied(model, prefix_delta(steps, k)):
            curve.append({"edits": k, **kept(model, tok, probe.retention)})
    return curve


def _sequence(seq: list, base, circuits: list, model, tok, corpus, others: dict, probe: EditProbe, args) -> dict:
    """The sequence (circuit, the recipe's strategy), scored after the whole of it; retention
    also after every tenth."""
    if args.sequence_dir:  # through a folder, resumable
        delta, steps, timings = sequence_in_folder(seq, model, tok, base, args.stats_corpus, args.sequence_dir,
                                                   args.sequence_chunk)
        first, last = timings[0], timings[-1]
        row = {"method": f"circuit (sequential via --append, {base.sequential_strategy})", "n": len(seq),
               "s_per_edit": round(sum(t["seconds"] for t in timings) / len(seq), 2),
               "s_per_edit_first_chunk": round(first["seconds"] / first["n"], 2),
               "s_per_edit_last_chunk": round(last["seconds"] / last["n"], 2), "chunks": timings}
    else:  # one after another, scored once at the end
        res = compute_edit(seq, model, tok, corpus, cfg=base, circuits=circuits[: len(seq)], mode="sequential",
                           progress=False)
        delta, steps = res.delta, res.steps
        row = {"method": f"circuit (sequential, {base.sequential_strategy})", "n": len(seq),
               "s_per_edit": round(res.seconds / len(seq), 2), "sites": [p.why for p in res.plans]}
    with applied(model, delta):
        m = _scored(model, tok, seq, others, probe)
    row = {**row, **m, "retention_curve": _retention_curve(model, tok, steps, probe)}
    print({k: v for k, v in row.items() if k not in ("chunks", "sites")}, flush=True)
    return row


def _table(rows: list[dict]) -> None:
    print("| method | n | ES | PS | NS | S | top-1 | fluency | SF [95% CI] (n) | RS true [95% CI] (n) | "
          "RS new [95% CI] (n) | portability [95% CI] (n) | moved [95% CI] (n) | retention [95% CI] (n) | "
          "perplexity before → after (rise [95% CI], n) | s / edit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ES" not in r:  # every single edit refused
            print(f"| {r['method']} | 0 |" + " — |" * 14)
            continue
        print(f"| {r['method']} | {r['n']} | {r['ES']:.1f} | {r['PS']:.1f} | {r['NS']:.1f} | {r['S']:.1f} | "
              f"{r['top1']:.1f} | {r['fluency']:.2f} | {cell(r.get('subject_specificity'))} | "
              f"{cell(r.get('relation_true'))} | {cell(r.get('relation_new'))} | {cell(r.get('portability'))} | "
              f"{cell(r.get('portability_moved'))} | {cell(r.get('retention'))} | "
              f"{ppl_cell(r.get('perplexity'))} | {r['s_per_edit']} |")
    curves = [(r["method"], r["retention_curve"]) for r in rows if r.get("retention_curve")]
    for name, curve in curves:
        print(f"\nretention along {name}: " + ", ".join(f"{c['edits']}: {cell(c)}" for c in curve))


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    cases = parse_cases(args.cases) if args.cases else None
    if cases and (args.batch or args.sequential or max(cases) >= args.n):
        ap.error("--cases: indices below --n, single edits only")
    model, tok = load_model(args.model)
    base = edit_config_for_model(model)
    for kv in args.set:
        key, _, val = kv.partition("=")
        base = dataclasses.replace(base, **{key: json.loads(val)})
    n_known, requests, others, disjoint, hard, candidates, probes = _requests(args, ap, model, tok)
    if max(args.batch, args.sequential) > len(requests):
        ap.error(f"{max(args.batch, args.sequential)} requests asked for, {len(requests)} can be built "
                 f"({'disjoint ' if disjoint else ''}neighbours, seed {args.seed})")
    retention = pick_retention(candidates, {r.subject for r in requests}, args.retention, args.seed, model, tok)
    probe = EditProbe.build(model, tok, hard, retention, not args.no_perplexity, args.single_retention)
    probe.probes = probes
    fp = model_fingerprint(model)
    corpus = resolve_corpus(model, tok, None, args.stats_corpus, fp, base.stats_samples, log=print)
    scanned = "" if args.pool == "known_1000" else " scanned"
    print(f"{args.model}: {args.pool}, {n_known} known facts{scanned}, {len(requests)} requests (seed {args.seed}, "
          f"{'disjoint' if disjoint else 'all'} neighbours), corpus "
          f"{corpus.name}, settings {args.set or 'recipe'}; {len(retention)} retention facts, perplexity "
          f"{'not scored' if probe.ppl_before is None else f'{probe.ppl_before:.2f} unedited'}; "
          f"{sum(map(len, probes.values()))} portability probes for {len(probes)} requests", flush=True)
    single = requests[: args.n]
    if cases:
        single = requests = [single[i] for i in cases]
    lc = config_for_model(model)
    lc.trace = lc.trace or base.mlp_site == "trace"
    methods = [m for m in args.methods.split(",") if m and args.n]
    batch_methods = [m for m in args.batch_methods.split(",") if m and args.batch]
    # a site depends on the circuit for the circuit and heads methods, and for the MLP methods
    # when the recipe leaves them more than one candidate layer (or asks for the traced one)
    located = {m for m in methods if SINGLE[m]["method"] in ("circuit", "heads")} | (
        {"circuit"} & set(batch_methods))
    site_free = (not located
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
                 "corpus": corpus.name, "locate_s": locate_s,
                 "retention_facts": [dataclasses.asdict(f) for f in retention],
                 "perplexity_text": "factedit/data/heldout_text.json" if probe.texts else None,
                 "partial": partial, "rows": rows}, indent=1))

    unedited = single or requests  # the single edits' requests, else the batch's or sequence's
    rows = [{"method": "none (unedited)", "n": len(unedited), **_scored(model, tok, unedited, others, probe),
             "s_per_edit": 0.0}]
    print(rows[-1], flush=True)
    save(rows, True)
    for name in methods:
        cfg = dataclasses.replace(base, **SINGLE[name])
        rows.append(_singles(name, cfg, single, circuits, model, tok, corpus, others, probe, args,
                             lambda row: save(rows + [row], True)))
        print({k: v for k, v in rows[-1].items() if k not in ("sites", "per_request")}, flush=True)
        save(rows, True)
    done = list(rows)
    rows += _batches(requests[: args.batch], batch_methods, base, circuits, model, tok, corpus, others, probe, args,
                     lambda batch_rows: save(done + batch_rows, True))
    if args.sequential:
        rows.append(_sequence(requests[: args.sequential], base, circuits, model, tok, corpus, others, probe, args))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"model {args.model}; corpus {corpus.name}; locate {locate_s:.1f} s per fact (not in s / edit)")
    _table(rows)
    save(rows, partial=False)


if __name__ == "__main__":
    main()
