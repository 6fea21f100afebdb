"""Why a ROME-style single edit can miss its own prompt although the value fit reached it.

    python benchmarks/insertion_diagnosis.py [--model smollm2-135m] [--n 20] [--seed 0] [--layer 3]
        [--cache FILE] [--json FILE]

Per request (the benchmark's requests, same seed): fit the MLP value change delta at the
layer (ROME's settings from the recipe, method mlp), read the key of every context (the bare
prompt and each prefix) and their mean k*, and report

- r_i = k*^T C^-1 k_i / k*^T C^-1 k*: the share of delta that ROME's rank-one update (inserted
  for k*) gives context i; r_0 is the bare prompt's (the edit prompt ES scores);
- p(new) on the bare prompt: unedited, with delta added at the subject's last token (what the
  fit optimised), and after each insertion;
- ES/PS/NS (CounterFact's comparison, no fluency) after each insertion: ``mean`` (ROME: k*),
  ``contexts`` (every context's own key, least squares against C, edit.insert_keys).

Fitted deltas and keys are cached (``--cache``), so insertions can be compared without refitting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch

from factedit.editing.api import edit_config_for_model
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import _Stats
from factedit.editing.insert import context_keys, rank_one, regularised
from factedit.editing.requests import EditRequest
from factedit.editing.values import ValueSites, context_prefixes, fit_values
from factedit.editing.weights import WeightDelta, applied
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.studies.known_edits import build_requests, known_facts, score_requests
from factedit.verify.metrics import compare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok = load_model(args.model)
    adapter = ModelLayout(model)
    cfg = dataclasses.replace(edit_config_for_model(model), method="mlp", mlp_layers=[args.layer])
    facts = known_facts(model, tok)
    requests = build_requests(facts, tok, args.n, seed=args.seed)[: args.n]
    fp = model_fingerprint(model)
    corpus = resolve_corpus(model, tok, None, ["sampled"], fp, cfg.stats_samples, log=print)
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    C = _Stats(adapter, tok, corpus, fp, cfg, False)[("mlp", args.layer)]
    Ci = torch.linalg.inv(regularised(C, cfg.ridge))
    cache = torch.load(args.cache, weights_only=True) if args.cache and os.path.exists(args.cache) else {}
    name = adapter.module_name(args.layer, adapter.spec.mlp_out)
    out = []
    for i, r in enumerate(requests):
        t0 = time.perf_counter()
        if i not in cache:
            fitted = fit_values(adapter, tok, [r], prefixes, ValueSites(args.layer, []), cfg)
            K = context_keys(adapter, tok, r, prefixes, "mlp", args.layer)  # (n_ctx, in), bare first
            cache[i] = {"delta": fitted.mlp[0].cpu(), "K": K.cpu(), "nll_fit": fitted.nll[0],
                        "nll_base": fitted.base_nll[0]}
            if args.cache:
                torch.save(cache, args.cache)
        d, K = cache[i]["delta"], cache[i]["K"].double()
        ks = K.mean(0)
        Ci_ks = Ci @ ks
        ratios = (K @ Ci_ks / (ks @ Ci_ks)).tolist()  # r_i per context; [0] is the bare prompt
        row = {"i": i, "prompt": r.filled_prompt, "true": r.target_true, "new": r.target_new,
               "nll_fit": cache[i]["nll_fit"], "r_bare": ratios[0], "r_min": min(ratios), "r_max": max(ratios)}

        def p_new(delta: WeightDelta | None, r: EditRequest = r) -> tuple[float, float]:
            if delta is None:
                c = compare(model, tok, [r.filled_prompt], r.target_new, r.target_true)
            else:
                with applied(model, delta):
                    c = compare(model, tok, [r.filled_prompt], r.target_new, r.target_true)
            return math.exp(-c["nll_new"][0]), math.exp(-c["nll_true"][0])

        row["p_new_unedited"], row["p_true_unedited"] = p_new(None)
        # delta added at the subject's last token of the bare prompt only (what the fit optimised)
        h = adapter.mlp(args.layer).register_forward_hook(_add_at(tok, r, d))
        try:
            row["p_new_fit"], row["p_true_fit"] = p_new(None)
        finally:
            h.remove()
        for how in ("mean", "contexts"):
            if how == "mean":
                b, a = rank_one(C, ks.float(), d, cfg.ridge)
            else:
                b, a = rank_one(C, ks.float(), d, cfg.ridge, context_keys=K.float())
            delta = WeightDelta()
            delta.add(name, b, a)
            cost = float(a.double() @ regularised(C, cfg.ridge) @ a.double().T)
            row[f"cost_{how}"] = cost
            row[f"r_bare_{how}"] = float(a.double() @ K[0])  # share of delta at the bare key
            row[f"p_new_{how}"], row[f"p_true_{how}"] = p_new(delta)
            with applied(model, delta):
                m = score_requests(model, tok, [r])
            row.update({f"{k}_{how}": m[k] for k in ("ES", "PS", "NS")})
        row["cost_ratio"] = row["cost_contexts"] / row["cost_mean"]
        out.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    for how in ("mean", "contexts"):
        es, ps, ns = (sum(o[f"{k}_{how}"] for o in out) / len(out) for k in ("ES", "PS", "NS"))
        print(f"{how}: ES {es:.1f} PS {ps:.1f} NS {ns:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "seed": args.seed, "layer": args.layer, "rows": out}, f, indent=1)


def _add_at(tok, r, d):
    """A forward hook adding ``d`` to the MLP output at the subject's last token of the bare prompt."""
    from factedit.analysis.spans import tokenize_with_subject

    s = tokenize_with_subject(tok, r.filled_prompt, r.subject).last_subject

    def hook(m, args, o):
        if o.shape[1] > s:  # the batch of teacher-forced rows of this one prompt
            o = o.clone()
            o[:, s] += d.to(o.dtype)
        return o
    return hook


if __name__ == "__main__":
    main()
