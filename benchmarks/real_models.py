"""Throughput of factedit on a real model, in one process: loading, locate (facts/s), the key
statistics (tokens/s, against plain forward passes over the same windows) and sampling the
default statistics corpus.

    python benchmarks/real_models.py --model smollm2-135m [--facts 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from factedit.analysis.locate import config_for_model, locate
from factedit.editing.corpora import pydoc_corpus, sample_texts
from factedit.editing.stats import _batches, _chunks, second_moments
from factedit.models.adapter import ModelAdapter
from factedit.models.loading import load_model
from factedit.studies.known_edits import known_facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    adapter = ModelAdapter(model)
    cfg = config_for_model(model)
    facts = known_facts(model, tok, limit=args.facts)
    locate(facts[0].prompt, facts[0].subject, model=model, tokenizer=tok, config=cfg)  # warm-up
    t0 = time.perf_counter()
    for f in facts:
        locate(f.prompt, f.subject, model=model, tokenizer=tok, config=cfg)
    locate_fps = len(facts) / (time.perf_counter() - t0)

    corpus = pydoc_corpus()
    windows = [w for b in _batches(_chunks(tok, corpus.texts, 128), args.tokens, 8) for w in b]
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in _batches(iter(windows), args.tokens, 8):
            model(input_ids=torch.tensor(b))
    fwd_tps = args.tokens / (time.perf_counter() - t0)
    rates = {}
    for name, sites in (("1 MLP layer", [("mlp", 0)]),
                        (f"all {adapter.n_layers} MLP layers", [("mlp", la) for la in range(adapter.n_layers)])):
        t0 = time.perf_counter()
        second_moments(adapter, tok, corpus, sites, "bench", samples=args.tokens, use_cache=False, progress=False)
        rates[name] = args.tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    texts = sample_texts(model, tok, 16, 64)
    sample_tps = sum(len(tok(t)["input_ids"]) for t in texts) / (time.perf_counter() - t0)

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"| {args.model} | figure |\n|---|---|")
    print(f"| load (cached folder) | {load_s:.1f} s |")
    print(f"| locate, whole circuit | {locate_fps:.2f} facts/s ({len(facts)} known facts) |")
    print(f"| plain forward, {args.tokens} tokens in windows of 128 | {fwd_tps:.0f} tokens/s |")
    for name, r in rates.items():
        print(f"| key statistics, {name} | {r:.0f} tokens/s ({fwd_tps / r:.2f}x a plain forward) |")
    print(f"| sampling the default statistics corpus (16 texts at a time) | {sample_tps:.0f} tokens/s |")


if __name__ == "__main__":
    main()
