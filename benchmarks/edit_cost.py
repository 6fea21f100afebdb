"""Where an edit's time goes: key statistics, single edits, one batch (the demo model), or a
real model's single edits phase by phase, as ratios to one forward pass of the same prompt.

    python benchmarks/edit_cost.py [--single 20] [--batch 1000]
    python benchmarks/edit_cost.py --model smollm2-135m [--single 10] [--seed 0]

Profiles the runs (cProfile) and prints, per phase, the cumulative seconds spent in the
functions that implement it: locating the fact, fitting the new values (the optimisation),
the keys, the rank-one / least-squares insertion, the key statistics, request checks.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import platform
import pstats
import time

import torch

from factedit.editing.api import edit_config_for_model
from factedit.editing.edit import compute_edit
from factedit.editing.stats import second_moments, world_corpus
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.studies.world_edits import sample_world_edits
from factedit.world.generate import World

PHASES = {
    "locate the fact": ("factedit/analysis/locate.py", "locate"),
    "fit new values (optimisation)": ("factedit/editing/values.py", "fit_values"),
    "keys at the edit site": ("factedit/editing/insert.py", "mean_keys"),
    "rank-one insertion": ("factedit/editing/insert.py", "rank_one"),
    "least-squares insertion (batch)": ("factedit/editing/insert.py", "least_squares"),
    "key statistics": ("factedit/editing/stats.py", "second_moments"),
    "request checks": ("factedit/editing/edit.py", "check_requests"),
}


def phase_seconds(prof: cProfile.Profile, phases: dict | None = None) -> dict[str, float]:
    """Per phase, the cumulative seconds of the function(s) that implement it: ``phases`` maps a
    label to (file, a function name or a tuple of names); default :data:`PHASES`."""
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    out = {}
    for label, (file, names) in (phases or PHASES).items():
        names = (names,) if isinstance(names, str) else names
        out[label] = sum(v[3] for (f, _ln, n), v in stats.items() if f.endswith(file) and n in names)
    return out


def profiled(fn):
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    out = fn()
    prof.disable()
    return time.perf_counter() - t, phase_seconds(prof), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--model", default=None, help="a real model (e.g. smollm2-135m): its single edits, phase by phase")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.model:
        from real_edit_cost import real_model_cost

        return real_model_cost(args.model, args.single, args.seed)
    torch.manual_seed(0)
    model, tok = load_model()
    world = World.load(model.name_or_path)
    corpus = world_corpus(world)
    cfg = edit_config_for_model(model)
    adapter = ModelLayout(model)
    fp = model_fingerprint(model)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    sites = [("mlp", la) for la in range(adapter.n_layers)]
    t = time.perf_counter()
    second_moments(adapter, tok, corpus, sites, fp, cfg.stats_samples, cfg.stats_max_length, use_cache=False,
                   progress=False)
    t_stats = time.perf_counter() - t
    print(f"key statistics, all {len(sites)} MLP layers, {cfg.stats_samples} tokens, uncached: {t_stats:.2f} s "
          "(cached afterwards by model fingerprint, layer and corpus)")

    reqs = [w.request for w in sample_world_edits(world, args.single, seed=1)]
    compute_edit([reqs[0]], model, tok, corpus, cfg=cfg, progress=False)  # warm the statistics cache
    secs, phases, _ = profiled(lambda: [compute_edit([r], model, tok, corpus, cfg=cfg, progress=False)
                                        for r in reqs])
    print(f"\nsingle edits: {args.single} edits, {secs / args.single:.3f} s per edit (profiled)")
    for k, v in phases.items():
        if v:
            print(f"  {k:34s} {v / args.single:7.3f} s per edit  ({100 * v / secs:4.1f}%)")

    if args.batch:
        reqs = [w.request for w in sample_world_edits(world, args.batch, seed=2)]
        bcfg = dataclasses.replace(cfg)
        secs, phases, _ = profiled(lambda: compute_edit(reqs, model, tok, corpus, cfg=bcfg, mode="batch",
                                                        progress=False))
        print(f"\nbatch of {args.batch} edits: {secs:.1f} s ({secs / args.batch:.3f} s per edit, profiled)")
        for k, v in phases.items():
            if v:
                print(f"  {k:34s} {v:8.1f} s  ({100 * v / secs:4.1f}%)")


if __name__ == "__main__":
    main()
