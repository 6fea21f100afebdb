"""Per-model counts of the request pools: per relation, facts and known facts; requests with
pairwise-disjoint subjects (none of them another's neighbour); the insertion pool's size.

    OMP_NUM_THREADS=1 python benchmarks/pool_counts.py --model smollm2-135m \
        --json benchmarks/results/pools-smollm2-135m-counts.json

The same operation as ``factedit pools count NAME --model M`` for each pool, one model load;
``places-no-continents`` is ``factedit pools count places --relations ...`` without the
continent relations (a model that answers one continent for every city "knows" many of them).
With ``--cache``, what the cache holds is read (its seconds are then those of the build that
wrote it) and the model's answers are reused across the two places counts.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from factedit.cli_pools import format_counts
from factedit.io import atomic_write_json
from factedit.models.loading import load_model
from factedit.studies.pools import build_pool, count_table, pool_relations

STRICT = ("city_country", "city_state", "region_country", "country_language", "country_currency", "country_capital")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-neighbours", type=int, default=10)
    ap.add_argument("--pools", default="known_1000,places,places-no-continents,insertion",
                    help="places-no-continents: places without the continent relations (one answer guesses many)")
    ap.add_argument("--cache", action="store_true", help="read and write the pool cache (seconds then may be 0)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t = time.perf_counter()
    model, tok = load_model(args.model)
    out = {"model": args.model, "seed": args.seed, "max_neighbours": args.max_neighbours,
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "load_s": round(time.perf_counter() - t, 1), "pools": {}}
    for label in args.pools.split(","):
        name, chosen = ("places", STRICT) if label == "places-no-continents" else (label, None)
        built = build_pool(name, model, tok, seed=args.seed, max_neighbours=args.max_neighbours, cache=args.cache,
                           log=lambda m: print(m, flush=True), relations=chosen)
        table = count_table(built, [r for r in pool_relations(name) if chosen is None or r["name"] in chosen])
        table["relations_chosen"] = chosen
        out["pools"][label] = table
        print(format_counts(table) + "\n", flush=True)
        if args.json:
            atomic_write_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
