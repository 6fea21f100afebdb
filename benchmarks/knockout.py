"""Attention-knockout sweep: the fast path against the paper's one-pass-per-intervention method.

For each model it runs the full sweep of one fact (3 source sets x L centre layers, plus the
clean run) both ways in this process and prints the time per fact each way, the sweep's cost
in plain forward passes of the same prompt (measured wall time, and counted token-layers),
peak memory of each way, and the largest difference between the two ways' curves. It also
times the sublayer-knockout sweep, the all-head vocabulary projection, and `locate` throughput
on the demo world.

Models: the embedded demo model (its first fact) and a randomly initialised GPT-2-XL-shaped
model (48 layers, width 1600, 25 heads, vocabulary 50257) on a prompt of ``--tokens`` random
tokens whose subject is tokens 1..3 (the shape of "Beats Music is owned by").

    python benchmarks/knockout.py                       # CPU, float32
    python benchmarks/knockout.py --device cuda --dtype bfloat16

The last line reads ``knockout speedup <X>x, sweep = <Y> forward passes, max diff <Z>``, with
X and Y measured on the 48-layer model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

from factedit.analysis.heads import head_scores
from factedit.analysis.knockout import SOURCE_SETS, KnockoutCurves, attention_knockout, window_layers
from factedit.analysis.projection import components
from factedit.analysis.spans import TokenizedPrompt, tokenize_with_subject
from factedit.analysis.sublayer import SUBLAYERS, sublayer_knockout
from factedit.models.adapter import ModelLayout


class PeakMemory:
    """Peak memory while the block runs, above what was in use when it began: CUDA allocator
    peak on a GPU, resident set size sampled every 5 ms on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _rss() - self.base)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable, device: str, repeat: int = 1) -> tuple[float, object]:
    """Median wall time over ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def counted_passes(L: int, T: int, window: int, rows_from: Callable[[int], int], n_rows_per_centre: int) -> float:
    """Token-layers the fast sweep computes, over the T*L of one plain forward pass (the clean
    run included)."""
    rerun = sum(n_rows_per_centre * (L - window_layers(c, window, L).start) * rows_from(c) for c in range(L))
    return 1 + rerun / (T * L)


def max_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    return max(abs(x - y) for s in a for x, y in zip(a[s], b[s], strict=True))


def ko_diff(a: KnockoutCurves, b: KnockoutCurves) -> float:
    return max_diff({s: a.curve(s) for s in SOURCE_SETS}, {s: b.curve(s) for s in SOURCE_SETS})


@torch.no_grad()
def bench_model(name: str, model, tp: TokenizedPrompt, window: int, device: str, repeat: int,
                naive: bool) -> dict:
    adapter = ModelLayout(model)
    L, T = adapter.n_layers, len(tp.input_ids)
    ids = torch.tensor([tp.input_ids], device=device)
    model(input_ids=ids)  # warm-up
    t_plain, _ = timed(lambda: model(input_ids=ids), device, repeat=max(3, repeat))

    with PeakMemory(device) as mem_fast:
        t_fast, fast = timed(lambda: attention_knockout(adapter, tp, window), device, repeat)
    row = {"model": name, "L": L, "T": T, "window": window, "plain_s": t_plain, "fast_s": t_fast,
           "fast_mem": mem_fast.peak,
           "passes": t_fast / t_plain,
           "counted_passes": counted_passes(L, T, window, lambda c: 1, len(SOURCE_SETS))}
    if naive:
        with PeakMemory(device) as mem_naive:
            t_naive, slow = timed(lambda: attention_knockout(adapter, tp, window, method="naive"), device)
        row.update(naive_s=t_naive, naive_mem=mem_naive.peak, speedup=t_naive / t_fast,
                   max_diff=ko_diff(fast.curves, slow.curves))

    # sublayer knockout sweep (window 1 as in the demo recipe), fast vs naive
    n_sub = T - tp.subject_span[0]
    t_sub, sub = timed(lambda: sublayer_knockout(adapter, None, tp, 1, fast.prediction), device, repeat)
    row.update(sub_s=t_sub, sub_passes=t_sub / t_plain,
               sub_counted=counted_passes(L, T, 1, lambda c: n_sub, len(SUBLAYERS)))
    if naive:
        t_sub_naive, sub_naive = timed(
            lambda: sublayer_knockout(adapter, None, tp, 1, fast.prediction, method="naive"), device)
        row.update(sub_naive_s=t_sub_naive, sub_speedup=t_sub_naive / t_sub,
                   sub_max_diff=max(max_diff(sub.prob_change, sub_naive.prob_change),
                                    max_diff(sub.extraction, sub_naive.extraction)))

    # all-head vocabulary projection: one clean pass recording the heads, then L*H projections
    def heads():
        return head_scores(adapter, components(adapter, tp.input_ids), fast.prediction)

    t_heads, _ = timed(heads, device, repeat)
    row.update(heads_s=t_heads, heads_passes=t_heads / t_plain)
    return row


def gpt2_xl_shaped(device: str, dtype: torch.dtype, layers: int, width: int, heads: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=50257, n_positions=1024)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


def locate_throughput(n: int) -> float:
    from factedit import locate
    from factedit.models.loading import load_model
    from factedit.world.generate import World

    model, tok = load_model()
    world = World.load(model.name_or_path)
    facts = [(world.prompts(e)[0][1], e.name) for e in world.entities[:n]]
    locate(facts[0][0], facts[0][1], model=model, tokenizer=tok)  # warm-up
    t = time.perf_counter()
    for prompt, subject in facts:
        locate(prompt, subject, model=model, tokenizer=tok)
    return n / (time.perf_counter() - t)


def report(row: dict) -> None:
    mb = 2**20
    print(f"\n== {row['model']}: L={row['L']}, T={row['T']} tokens, window {row['window']}")
    print(f"  plain forward pass        {row['plain_s'] * 1e3:9.1f} ms")
    print(f"  knockout sweep, fast      {row['fast_s'] * 1e3:9.1f} ms   = {row['passes']:.2f} forward passes "
          f"(counted token-layers: {row['counted_passes']:.2f})   peak memory {row['fast_mem'] / mb:.0f} MiB")
    if "naive_s" in row:
        print(f"  knockout sweep, naive     {row['naive_s'] * 1e3:9.1f} ms   = {row['naive_s'] / row['plain_s']:.1f} "
              f"forward passes   (runs after the fast sweep and reuses its memory: +{row['naive_mem'] / mb:.0f} MiB)")
        print(f"  speedup                   {row['speedup']:9.1f}x   "
              f"max diff {row['max_diff']:.1e} (relative change, %)")
    print(f"  sublayer sweep, fast      {row['sub_s'] * 1e3:9.1f} ms   = {row['sub_passes']:.2f} forward passes "
          f"(counted: {row['sub_counted']:.2f})")
    if "sub_naive_s" in row:
        print(f"  sublayer sweep, naive     {row['sub_naive_s'] * 1e3:9.1f} ms   speedup {row['sub_speedup']:.1f}x   "
              f"max diff {row['sub_max_diff']:.1e}")
    print(f"  all-head projection       {row['heads_s'] * 1e3:9.1f} ms   = {row['heads_passes']:.2f} forward passes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=10, help="prompt length of the 48-layer model's fact")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--heads", type=int, default=25)
    ap.add_argument("--window", type=int, default=9, help="knockout window on the large model (the paper's 9)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive runs (no speedup or diff)")
    ap.add_argument("--locate-facts", type=int, default=50)
    ap.add_argument("--parity-dtype", default="float64", choices=["float64", "none"],
                    help="also compare both ways on the large model in this dtype, where rounding cannot hide "
                         "a logic difference (the timed dtype's difference is printed too)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")

    from factedit.models.loading import load_model
    from factedit.world.generate import World

    model, tok = load_model(device=args.device, dtype=args.dtype)
    world = World.load(model.name_or_path)
    ent = world.entities[0]
    tp = tokenize_with_subject(tok, world.prompts(ent)[0][1], ent.name)
    demo = bench_model("demo model", model, tp, 3, args.device, args.repeat, not args.no_naive)
    report(demo)
    fps = locate_throughput(args.locate_facts) if args.device == "cpu" else float("nan")
    if fps == fps:
        print(f"  locate throughput         {fps:9.1f} facts/s (demo world, full circuit per fact)")
    del model

    t = time.perf_counter()
    big = gpt2_xl_shaped(args.device, dtype, args.layers, args.width, args.heads)
    print(f"\n(random {args.layers}-layer model built in {time.perf_counter() - t:.0f} s)")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (args.tokens,), generator=g).tolist()
    big_row = bench_model(f"random GPT-2-XL-shaped ({args.layers} layers, width {args.width})", big,
                          TokenizedPrompt("", ids, (1, 4)), args.window, args.device, args.repeat,
                          not args.no_naive)
    report(big_row)
    tp = TokenizedPrompt("", ids, (1, 4))
    parity = None
    if args.parity_dtype != "none" and not args.no_naive:
        adapter = ModelLayout(big.to(getattr(torch, args.parity_dtype)))
        fast = attention_knockout(adapter, tp, args.window)
        slow = attention_knockout(adapter, tp, args.window, method="naive")
        parity = ko_diff(fast.curves, slow.curves)
        print(f"  parity in {args.parity_dtype}: max diff {parity:.1e} (in {args.dtype}: {big_row['max_diff']:.1e}, "
              "rounding of different batch shapes)")
    if "speedup" in big_row:
        z = parity if parity is not None else big_row["max_diff"]
        where = args.parity_dtype if parity is not None else args.dtype
        print(f"knockout speedup {big_row['speedup']:.1f}x, sweep = {big_row['passes']:.2f} forward passes, "
              f"max diff {z:.1e} ({where}; {args.dtype}: {big_row['max_diff']:.1e})")
    else:
        print(f"knockout speedup n/a (--no-naive), sweep = {big_row['passes']:.2f} forward passes, max diff n/a")


if __name__ == "__main__":
    main()
