"""How much of the fitted residual a MEMIT-style batch spread delivers.

For a batch of known-fact requests (as ``real_edit_quality.py`` builds them), the spread fits
each request's residual at the top batch layer L (the value fit's MLP output change there,
carried through a post-MLP norm where the family has one), then writes shares of it into the
MLP weights of the batch layers. This script measures, on the edited model, the residual
after block L at the subject's last token (averaged over the value fit's contexts):

- delivered: (h_edited - h_base) . want / |want|^2, per request (1: all of it, along it);
- left: |target - h_edited| / |want|.

    OMP_NUM_THREADS=1 python benchmarks/spread_diagnosis.py --model gemma3-270m --batch 30 \\
        --set batch_passes=3 --fit-cache DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from factedit.editing.api import edit_config_for_model
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import compute_edit, context_prefixes
from factedit.editing.insert import mean_hidden, mlp_to_residual
from factedit.editing.weights import applied
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.studies.known_edits import build_requests, known_facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override an edit setting, e.g. --set batch_passes=3")
    ap.add_argument("--fit-cache", default=None, metavar="DIR")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    cfg = dataclasses.replace(edit_config_for_model(model), method="mlp")
    for kv in args.set:
        key, _, val = kv.partition("=")
        cfg = dataclasses.replace(cfg, **{key: json.loads(val)})
    requests = build_requests(known_facts(model, tok), tok, args.batch, seed=args.seed, disjoint=True)[: args.batch]
    corpus = resolve_corpus(model, tok, None, ["sampled"], model_fingerprint(model), cfg.stats_samples, log=print)
    res = compute_edit(requests, model, tok, corpus, cfg=cfg, circuits=[None] * len(requests), mode="batch",
                       progress=False, fit_cache=args.fit_cache, log=print)
    if res.fit is None:
        raise SystemExit("spread_diagnosis: batch_strategy refit fits no residual to measure against")
    adapter = ModelLayout(model)
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    top = cfg.batch_layers[-1] if cfg.batch_layers else res.fit_site[0]
    base = mean_hidden(adapter, tok, requests, prefixes, top)  # (n, d)
    want = mlp_to_residual(adapter, tok, requests, prefixes, top, res.fit.mlp)  # (n, d)
    with applied(model, res.delta):
        got = mean_hidden(adapter, tok, requests, prefixes, top) - base  # (n, d)
    delivered = (got * want).sum(-1) / want.pow(2).sum(-1)  # (n,)
    left = (want - got).norm(dim=-1) / want.norm(dim=-1)  # (n,)
    print(f"{args.model}, batch of {len(requests)}, settings {args.set or 'recipe'}: wanted residual change "
          f"{float(want.norm(dim=-1).mean()):.1f} (residual {float(base.norm(dim=-1).mean()):.1f}) after L{top}")
    print(f"delivered along it: mean {float(delivered.mean()):.3f}, min {float(delivered.min()):.3f}, "
          f"max {float(delivered.max()):.3f}; left: mean {float(left.mean()):.3f}")
    print("update norms:", {k: round(v, 2) for k, v in res.delta.norms().items()})


if __name__ == "__main__":
    main()
