"""Edit quality on the demo world: the targeted edit against the ROME-style MLP-only edit and
plain LoRA fine-tuning, side by side, single edits and one batch.

    python benchmarks/edit_quality.py [--single 100] [--batch 1000] [--sequential 0] [--model DIR]
        [--strategies refit,nullspace,kept] [--set KEY=JSON ...]

Prints one table (and writes it as JSON with --json FILE). Runs on CPU in minutes. A
sequential row also gives the seconds per edit over the first and the last tenth of the
sequence, the memory the kept keys take (constant) and the size of the stored history.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import time

import torch

from factedit.editing.api import edit_config_for_model
from factedit.editing.edit import compute_edit
from factedit.editing.history import sequence_bytes
from factedit.editing.stats import world_corpus
from factedit.editing.weights import applied
from factedit.models.loading import load_model
from factedit.studies.world_edits import WorldEdit, run_world_edits, sample_world_edits, score_world_edits
from factedit.world.generate import World


def _cost(nll: list[dict]) -> dict[str, float] | None:
    """Mean seconds per edit of each part of a sequential sweep (None where not recorded)."""
    parts = [n["seconds"] for n in nll if "seconds" in n]
    return {k: round(sum(p[k] for p in parts) / len(parts), 3) for k in parts[0]} if parts else None


def run_sequential(model, tok, world: World, corpus, edits: list[WorldEdit], cfg) -> dict:
    """One edit after another on the model edited so far; scored once at the end."""
    t0 = time.perf_counter()
    res = compute_edit([w.request for w in edits], model, tok, corpus, cfg=cfg, mode="sequential", progress=False)
    seconds = time.perf_counter() - t0
    ss = res.step_seconds
    k = max(1, len(ss) // 10)
    with applied(model, res.delta):
        scores = score_world_edits(model, tok, world, edits)
        # efficacy of the first and the last tenth of the sequence, read at its end: the first
        # tells drift (later edits undoing earlier ones), the last edits that never took
        tenths = {"efficacy_first_tenth": score_world_edits(model, tok, world, edits[:k])["efficacy"],
                  "efficacy_last_tenth": score_world_edits(model, tok, world, edits[-k:])["efficacy"]}
    lw = res.step_layers
    kept = sum(g.numel() * g.element_size() for g in res.sequence.gram.values()) if res.sequence else 0
    return {"n": len(edits), "mode": f"sequential, {cfg.sequential_strategy}", "method": cfg.method,
            "seconds": round(seconds, 2), **scores,
            "s_per_edit_first": round(sum(ss[:k]) / k, 3), "s_per_edit_last": round(sum(ss[-k:]) / k, 3),
            **tenths, "layers_per_edit_first": round(sum(map(len, lw[:k])) / k, 2) if lw else None,
            "layers_per_edit_last": round(sum(map(len, lw[-k:])) / k, 2) if lw else None,
            "reasserted": sum(len(n.get("reasserted", [])) for n in res.nll),  # earlier edits swept again
            "reasserted_last_tenth": sum(len(n.get("reasserted", [])) for n in res.nll[-k:]),
            # where an edit's seconds go (refit/nullspace): its own sweep, reading its keys, the
            # re-assertion check and the re-sweeps, mean per edit over the first and the last tenth
            "cost_first_tenth": _cost(res.nll[:k]), "cost_last_tenth": _cost(res.nll[-k:]),
            "kept_keys_mib": round(kept / 2**20, 1),
            "history_mib": round(len(sequence_bytes(res.steps, res.step_keys)) / 2**20, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--single", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--sequential", type=int, default=0, help="edits applied one after another (same facts as --batch)")
    ap.add_argument("--strategies", default=None,
                    help="sequential strategies to compare (refit, nullspace, kept); default: the recipe's")
    ap.add_argument("--methods", default="circuit,mlp,lora")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override an edit setting for every row, e.g. --set sequential_lambda=3000")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    world = World.load(model.name_or_path)
    corpus = world_corpus(world)
    base = edit_config_for_model(model)
    for kv in args.set:
        key, _, val = kv.partition("=")
        base = dataclasses.replace(base, **{key: json.loads(val)})
        base.validate()
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
        for strategy in (args.strategies or cfg.sequential_strategy).split(",") if args.sequential else []:
            rows.append(run_sequential(model, tok, world, corpus, sample_world_edits(world, args.sequential, seed=2),
                                       dataclasses.replace(cfg, sequential_strategy=strategy)))
            print(rows[-1], flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    cols = ["efficacy", "paraphrase", "neighbourhood", "other_relations"]
    print(f"| method | edits | {' | '.join(cols)} | seconds | s / edit, first -> last tenth | kept keys, history |")
    print("|---|---|" + "---|" * (len(cols) + 3))
    for r in rows:
        label = f"{r['method']} ({r['mode']})"
        cost = (f"{r['s_per_edit_first']} -> {r['s_per_edit_last']} | {r['kept_keys_mib']} MiB, "
                f"{r['history_mib']} MiB" if "s_per_edit_first" in r else "| ")
        print(f"| {label} | {r['n']} | " + " | ".join(f"{100 * r.get(c, float('nan')):.1f}" for c in cols)
              + f" | {r['seconds']} | {cost} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
