"""Edit quality on the demo world: the targeted edit against the ROME-style MLP-only edit and
plain LoRA fine-tuning, side by side, single edits and one batch.

    python benchmarks/edit_quality.py [--single 100] [--batch 1000] [--sequential 0] [--model DIR]

Prints one table (and writes it as JSON with --json FILE). Runs on CPU in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import torch

from factedit.editing.api import edit_config_for_model
from factedit.editing.stats import world_corpus
from factedit.models.loading import load_model
from factedit.world.edit_quality import run_world_edits, sample_world_edits
from factedit.world.generate import World


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--single", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--sequential", type=int, default=0, help="edits applied one after another (same facts as --batch)")
    ap.add_argument("--methods", default="circuit,mlp,lora")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    world = World.load(model.name_or_path)
    corpus = world_corpus(world)
    base = edit_config_for_model(model)
    rows = []
    for method in args.methods.split(","):
        cfg = dataclasses.replace(base, method=method)
        if args.single:
            rows.append(run_world_edits(model, tok, world, corpus, sample_world_edits(world, args.single, seed=1),
                                        cfg, "single"))
            print(rows[-1], flush=True)
        if args.batch:
            rows.append(run_world_edits(model, tok, world, corpus, sample_world_edits(world, args.batch, seed=2),
                                        cfg, "batch"))
            print(rows[-1], flush=True)
        if args.sequential:
            rows.append(run_world_edits(model, tok, world, corpus,
                                        sample_world_edits(world, args.sequential, seed=2), cfg, "sequential"))
            print(rows[-1], flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    cols = ["efficacy", "paraphrase", "neighbourhood", "other_relations"]
    print(f"| method | edits | {' | '.join(cols)} | seconds |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        label = f"{r['method']} ({r['mode']})"
        print(f"| {label} | {r['n']} | " + " | ".join(f"{100 * r.get(c, float('nan')):.1f}" for c in cols)
              + f" | {r['seconds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
