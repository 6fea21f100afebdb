"""Analysis cost and throughput of factedit on a real model, in one process.

Per known fact (known_1000 facts the model predicts, in file order), interleaved so that a
busy machine slows every figure alike:
- one plain forward pass of the prompt (``model(input_ids)``, median of 5);
- factedit's attention-knockout sweep (its clean pass included);
- factedit's whole ``locate`` (the circuit: knockout, projections, heads, OV checks, sublayer
  knockout with its extraction curves; no related text, as the audit of known_1000 runs it);
- a reference written here with plain transformers hooks: the paper's procedure, one full
  forward pass per intervention (1 + 3L passes), on the first ``--reference-facts`` facts, with
  the largest difference of its curves from factedit's.
Then: the audit's throughput (``run_audit`` over the first ``--audit`` known_1000 records, known
and unknown, one process), the key statistics of every MLP layer against a plain forward pass
over the same windows, loading, and sampling the default statistics corpus.

    OMP_NUM_THREADS=1 python benchmarks/real_models.py --model smollm2-135m --threads 1

The last line gives the ratios: each figure over one plain forward pass of the same prompt.
Only APIs that predate issue 21 are used, so the same script measures the code before it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from factedit.analysis.knockout import SOURCE_SETS, attention_knockout, source_positions, window_layers
from factedit.analysis.locate import config_for_model, locate
from factedit.analysis.spans import tokenize_with_subject
from factedit.models.adapter import ModelLayout
from factedit.models.loading import load_model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU kernels run asynchronously: time them to their end


def timed(fn: Callable) -> tuple[float, object]:
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


@torch.no_grad()
def hooks_reference(model, input_ids: list[int], sources: dict[str, list[int]], window: int) -> dict[str, list[float]]:
    """The paper's attention knockout with plain transformers hooks: for each source set and
    centre layer, one full forward pass in which the attention modules of the window get the
    dtype's minimum added to the logits of the edges last -> sources. Relative change (%) of
    p(clean top-1 token) at the last position."""
    layers = model.model.layers
    L, T, q = len(layers), len(input_ids), len(input_ids) - 1
    ids = torch.tensor([input_ids], device=model.device)
    p_clean = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    pred = int(p_clean.argmax())
    p0 = float(p_clean[pred])
    curves: dict[str, list[float]] = {s: [] for s in SOURCE_SETS}
    for s in SOURCE_SETS:
        for c in range(L):
            def block(module, args, kwargs, src=sources[s]):
                m = kwargs.get("attention_mask")
                if m is None:  # no mask given: causal
                    m = torch.full((1, 1, T, T), torch.finfo(torch.float32).min, device=ids.device).triu(1)
                m = m.clone()
                m[..., q, src] = torch.finfo(m.dtype).min
                kwargs["attention_mask"] = m
                return args, kwargs

            handles = [layers[la].self_attn.register_forward_pre_hook(block, with_kwargs=True)
                       for la in window_layers(c, window, L)] if sources[s] else []
            p = float(model(input_ids=ids).logits[0, -1].float().softmax(-1)[pred])
            for h in handles:
                h.remove()
            curves[s].append((p - p0) / p0 * 100.0)
    return curves


def known(model, tok, limit: int) -> list[dict]:
    import json

    from factedit.audit.dataset import bundled

    out = []
    for rec in json.loads(bundled("known_1000").read_text()):
        ids = tok(rec["prompt"])["input_ids"]
        with torch.no_grad():
            pred = int(model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].argmax())
        if pred == tok(" " + rec["attribute"].strip(), add_special_tokens=False)["input_ids"][0]:
            out.append(rec)
            if len(out) >= limit:
                break
    return out


def bench_locate(model, tok, cfg, facts: list[dict], n_reference: int) -> dict:
    adapter = ModelLayout(model)
    rcfg = cfg.resolved(adapter.n_layers)
    rows: dict[str, list[float]] = {"forward": [], "sweep": [], "locate": [], "lean": [], "reference": [],
                                    "tokens": []}
    diffs = []
    f0 = facts[0]
    locate(f0["prompt"], f0["subject"], model=model, tokenizer=tok, config=cfg)  # warm-up
    for i, f in enumerate(facts):
        tp = tokenize_with_subject(tok, f["prompt"], f["subject"])
        ids = torch.tensor([tp.input_ids], device=model.device)
        with torch.no_grad():
            model(input_ids=ids)
            fwd = statistics.median(timed(lambda ids=ids: model(input_ids=ids))[0] for _ in range(5))
        t_sweep, sweep = timed(lambda tp=tp: attention_knockout(adapter, tp, rcfg.knockout_window,
                                                                block_bos=rcfg.knockout_bos))
        t_loc, _ = timed(lambda f=f: locate(f["prompt"], f["subject"], model=model, tokenizer=tok, config=cfg))
        try:  # locate as the audit runs it (these options came with issue 21)
            t_lean, _ = timed(lambda f=f: locate(f["prompt"], f["subject"], model=model, tokenizer=tok, config=cfg,
                                                 extraction=False, heads="extraction"))
            rows["lean"].append(t_lean / fwd)
        except TypeError:
            pass
        rows["forward"].append(fwd)
        rows["tokens"].append(len(tp.input_ids))
        rows["sweep"].append(t_sweep / fwd)
        rows["locate"].append(t_loc / fwd)
        if i < n_reference:
            t_ref, ref = timed(lambda tp=tp: hooks_reference(model, tp.input_ids,
                                                             source_positions(tp, rcfg.knockout_bos),
                                                             rcfg.knockout_window))
            rows["reference"].append(t_ref / fwd)
            diffs.append(max(abs(a - b) for s in SOURCE_SETS
                             for a, b in zip(ref[s], sweep.curves.curve(s), strict=True)))
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    med["max_diff"] = max(diffs) if diffs else float("nan")
    med["n"] = len(facts)
    return med


def flops_of(fn: Callable) -> float:
    """Floating-point operations of the matrix products ``fn`` runs (torch's own count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def bench_arithmetic(model, tok, cfg, f: dict) -> dict:
    """How much arithmetic ``locate`` does, in plain forward passes of the same prompt (FLOPs
    counted by torch), and the best time that arithmetic could take on this machine: at the rate
    of a rerun-shaped matrix product (512 rows by the MLP's input width and hidden width), the
    fastest shape the reruns use. Time cannot go below ``flops / peak``."""
    ids = torch.tensor([tok(f["prompt"])["input_ids"]], device=model.device)
    one = flops_of(lambda: model(input_ids=ids))
    with torch.no_grad():
        fwd_s = statistics.median(timed(lambda: model(input_ids=ids))[0] for _ in range(5))
    loc = flops_of(lambda: locate(f["prompt"], f["subject"], model=model, tokenizer=tok, config=cfg))
    lean = flops_of(lambda: locate(f["prompt"], f["subject"], model=model, tokenizer=tok, config=cfg,
                                   extraction=False, heads="extraction"))
    c = model.config
    d, ff = c.hidden_size, getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    a = torch.randn(512, d, device=model.device, dtype=next(model.parameters()).dtype)
    w = torch.randn(d, ff, device=a.device, dtype=a.dtype)
    for _ in range(3):
        a @ w
    t, _ = timed(lambda: [a @ w for _ in range(20)])
    peak = 2 * 512 * d * ff * 20 / t  # FLOP/s
    return {"pass_gflop": one / 1e9, "pass_rate": one / fwd_s / 1e9, "peak": peak / 1e9,
            "locate_ar": loc / one, "lean_ar": lean / one,
            "locate_floor": loc / peak / fwd_s, "lean_floor": lean / peak / fwd_s}


def bench_audit(model, tok, cfg, n: int) -> tuple[float, int]:
    from factedit.audit.dataset import load_facts
    from factedit.audit.run import run_audit

    facts = load_facts("known_1000")[:n]
    with tempfile.TemporaryDirectory() as out:
        t, s = timed(lambda: run_audit(facts, model=model, tokenizer=tok, out=out, config=cfg,
                                       dataset_name="known_1000", progress=False, log=lambda m: None))
    return n / t, s["known"]


def bench_stats(model, tok, tokens: int) -> tuple[float, dict[str, float]]:
    from factedit.editing.corpora import pydoc_corpus
    from factedit.editing.stats import _batches, _chunks, second_moments

    adapter = ModelLayout(model)
    corpus = pydoc_corpus()
    windows = [w for b in _batches(_chunks(tok, corpus.texts, 128), tokens, 8) for w in b]
    with torch.no_grad():
        t, _ = timed(lambda: [model(input_ids=torch.tensor(b, device=model.device))
                              for b in _batches(iter(windows), tokens, 8)])
    fwd_tps = tokens / t
    rates = {}
    for name, sites in (("1 MLP layer", [("mlp", 0)]),
                        (f"all {adapter.n_layers} MLP layers", [("mlp", la) for la in range(adapter.n_layers)])):
        t, _ = timed(lambda s=sites: second_moments(adapter, tok, corpus, s, "bench", samples=tokens,
                                                    use_cache=False, progress=False))
        rates[name] = tokens / t
    return fwd_tps, rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=10, help="known facts timed through locate")
    ap.add_argument("--reference-facts", type=int, default=2, help="of those, how many also through the reference")
    ap.add_argument("--audit", type=int, default=60, help="known_1000 records audited (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the statistics corpus (0: skip)")
    ap.add_argument("--sample", action="store_true", help="also time sampling the default statistics corpus")
    ap.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_load, (model, tok) = timed(lambda: load_model(args.model, dtype=args.dtype, device=args.device))
    cfg = config_for_model(model)
    L = ModelLayout(model).n_layers
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    print(f"machine: {where}, torch {torch.__version__}, {next(model.parameters()).dtype}")
    print(f"| {args.model} | figure |\n|---|---|")
    print(f"| load (cached folder) | {t_load:.1f} s |")

    facts = known(model, tok, args.facts)
    m = bench_locate(model, tok, cfg, facts, args.reference_facts)
    print(f"| one plain forward pass (median over {m['n']} known facts, {m['tokens']:.0f} tokens) | "
          f"{m['forward'] * 1e3:.0f} ms |")
    print(f"| knockout sweep, factedit (3 x {L} rows + clean pass) | {m['sweep']:.1f} forward passes |")
    print(f"| `locate`, whole circuit | {m['locate']:.1f} forward passes |")
    if "lean" in m:
        print(f"| `locate` as the audit runs it (no sublayer extraction curves, extraction heads only) | "
              f"{m['lean']:.1f} forward passes |")
    if "reference" in m:
        print(f"| knockout sweep, one pass per intervention (plain transformers hooks, {1 + 3 * L} passes) | "
              f"{m['reference']:.1f} forward passes (max diff from factedit's curves {m['max_diff']:.1e} points) |")
    ar = bench_arithmetic(model, tok, cfg, facts[0])
    print(f"| arithmetic of one plain forward pass (first fact; torch's count of matrix-product FLOPs) | "
          f"{ar['pass_gflop']:.2f} GFLOP, run at {ar['pass_rate']:.1f} GFLOP/s |")
    print(f"| arithmetic of `locate`, whole circuit / as the audit runs it | {ar['locate_ar']:.1f} / "
          f"{ar['lean_ar']:.1f} forward passes |")
    print(f"| this machine's rate for a rerun-shaped product (512 x {model.config.hidden_size} by the MLP) | "
          f"{ar['peak']:.1f} GFLOP/s ({ar['peak'] / ar['pass_rate']:.1f}x the plain pass's) |")
    print(f"| least time that arithmetic can take at that rate: whole circuit / as the audit runs it | "
          f"{ar['locate_floor']:.1f} / {ar['lean_floor']:.1f} forward passes |")
    audit_fps = known_n = audit_passes = None
    if args.audit:
        audit_fps, known_n = bench_audit(model, tok, cfg, args.audit)
        audit_passes = 1 / audit_fps / m["forward"]
        print(f"| audit, first {args.audit} known_1000 records ({known_n} known) | {audit_fps:.2f} records/s "
              f"({audit_passes:.1f} forward passes per record) |")
    stats_ratio = None
    if args.tokens:
        fwd_tps, rates = bench_stats(model, tok, args.tokens)
        print(f"| plain forward, {args.tokens} tokens in windows of 128, batches of 8 | {fwd_tps:.0f} tokens/s |")
        for name, r in rates.items():
            print(f"| key statistics, {name} | {r:.0f} tokens/s ({fwd_tps / r:.2f}x a plain forward) |")
        stats_ratio = fwd_tps / list(rates.values())[-1]
    if args.sample:
        from factedit.editing.corpora import sample_texts

        t, texts = timed(lambda: sample_texts(model, tok, 16, 64))
        print(f"| sampling the default statistics corpus (16 texts at a time) | "
              f"{sum(len(tok(x)['input_ids']) for x in texts) / t:.0f} tokens/s |")
    def fmt(x: float | None, unit: str = "") -> str:
        return "n/a" if x is None else f"{x:.2f}{unit}"

    print(f"ratios ({args.model}, {args.threads} thread(s)), in forward passes: knockout sweep {m['sweep']:.1f}, "
          f"locate {m['locate']:.1f} (as the audit runs it: {fmt(m.get('lean'))}; arithmetic {ar['locate_ar']:.1f}, "
          f"least time at this machine's product rate {ar['locate_floor']:.1f}), "
          f"one-pass-per-intervention reference {fmt(m.get('reference'))}; audit {fmt(audit_passes)} per record "
          f"({fmt(audit_fps)} records/s); statistics of all layers {fmt(stats_ratio, 'x')} a plain forward")


if __name__ == "__main__":
    main()
