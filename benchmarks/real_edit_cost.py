"""A real model's single edit, phase by phase (``edit_cost.py --model NAME``).

Each request (CounterFact-style, from the model's known facts) is edited as `factedit edit`
does it, with the statistics cached first: locate the fact, fit the new values, read the keys,
insert, write the adapter folder, verify it. Every phase is timed in the same run (cProfile's
cumulative seconds of the functions that implement it) and printed as seconds and as a ratio
to one plain forward pass of the same prompt. The value fit's arithmetic is counted
(torch's FLOP counter: matrix products, forward and backward) and set against this CPU's
measured matrix-product rate at the fit's shapes: the least time that arithmetic can take.
"""

from __future__ import annotations

import cProfile
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from edit_cost import phase_seconds
from torch.utils.flop_counter import FlopCounterMode

from factedit.analysis.locate import config_for_model, locate
from factedit.editing.api import edit_config_for_model
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import compute_edit
from factedit.editing.export import save_edit
from factedit.models.fingerprint import model_fingerprint
from factedit.models.loading import load_model
from factedit.studies.known_edits import build_requests, known_facts
from factedit.verify.run import verify

PHASES = {  # label: (file, function) whose cumulative time is the phase
    "locate": ("factedit/analysis/locate.py", "locate"),
    "value fit": ("factedit/editing/values.py", "fit_values"),
    "keys": ("factedit/editing/insert.py", ("context_keys", "mean_keys")),
    "insertion": ("factedit/editing/insert.py", ("rank_one", "least_squares")),
    "write": ("factedit/editing/export.py", "save_edit"),
    "verify": ("factedit/verify/run.py", "verify"),
}


def _forward_seconds(model, ids: list[int], repeat: int = 20) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gemm_rate(m: int, k: int, n: int, repeat: int = 50) -> float:
    """FLOP/s of a (m, k) x (k, n) float32 product, forward-pass style, on this thread count."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * m * k * n * repeat / (time.perf_counter() - t)


def real_model_cost(name: str, n: int, seed: int) -> None:
    torch.manual_seed(0)
    model, tok = load_model(name)
    cfg = edit_config_for_model(model)
    fp = model_fingerprint(model)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {name}, method {cfg.method}, {cfg.n_prefixes} context prefixes, {cfg.steps} steps")
    facts = known_facts(model, tok)
    requests = build_requests(facts, tok, n + 1, seed=seed)
    corpus = resolve_corpus(model, tok, None, ["sampled"], fp, cfg.stats_samples, log=print)
    lc = config_for_model(model)
    warm = compute_edit([requests[0]], model, tok, corpus, cfg=cfg, progress=False)  # statistics of its sites
    print(f"warm-up edit (statistics of its sites, if not cached): {warm.seconds:.1f} s")
    rows = []
    for r in requests[1:]:
        # the statistics of the sites this fact's circuit needs, computed before the timed run
        c = locate(r.prompt, r.subject, model=model, tokenizer=tok, config=lc, fingerprint=fp)
        compute_edit([r], model, tok, corpus, cfg=cfg, circuits=[c], progress=False)
        prof = cProfile.Profile()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            prof.enable()
            c = locate(r.prompt, r.subject, model=model, tokenizer=tok, config=lc, fingerprint=fp)
            res = compute_edit([r], model, tok, corpus, cfg=cfg, circuits=[c], progress=False)
            save_edit(res, Path(tmp) / "edit", model, tok, circuits=[c])
            rep = verify(model=model, tokenizer=tok, adapter=Path(tmp) / "edit")
            prof.disable()
            total = time.perf_counter() - t
        ids = tok(r.filled_prompt)["input_ids"]
        rows.append({"total": total, **phase_seconds(prof, PHASES), "forward": _forward_seconds(model, ids),
                     "passed": rep.all_passed})
        print(f"  {r.filled_prompt!r} -> {r.target_new!r}: {total:.1f} s, "
              + ", ".join(f"{k} {rows[-1][k]:.2f}" for k in PHASES), flush=True)
    fwd = statistics.median(x["forward"] for x in rows)
    print(f"\n{len(rows)} single edits (statistics cached); one forward pass of the prompt: {1000 * fwd:.1f} ms "
          "(median)")
    print(f"{'phase':12s} {'median s':>9s} {'x forward':>10s}")
    for k in ("total", *PHASES):
        med = statistics.median(x[k] for x in rows)
        print(f"{k:12s} {med:9.2f} {med / fwd:10.0f}")
    print(f"verify passed {sum(x['passed'] for x in rows)} of {len(rows)}")
    print(f"memory peak (resident): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    _fit_floor(model, tok, corpus, cfg, requests[1], lc, fp)


def _fit_floor(model, tok, corpus, cfg, r, lc, fp) -> None:
    """The value fit's matrix-product arithmetic and the least time it takes at this CPU's rate."""
    c = locate(r.prompt, r.subject, model=model, tokenizer=tok, config=lc, fingerprint=fp)
    with FlopCounterMode(display=False) as fc:
        t = time.perf_counter()
        res = compute_edit([r], model, tok, corpus, cfg=cfg, circuits=[c], progress=False)
        secs = time.perf_counter() - t
    flops = fc.get_total_flops()
    d = model.config.hidden_size
    ff = getattr(model.config, "intermediate_size", 4 * d)
    rate = max(_gemm_rate(128, d, ff), _gemm_rate(128, ff, d))
    steps = len(res.nll) and cfg.steps
    print(f"\nvalue fit + keys + insertion of one edit: {flops / 1e9:.0f} GFLOP of matrix products in {secs:.1f} s "
          f"({flops / secs / 1e9:.1f} GFLOP/s achieved); this CPU's product rate at the fit's shapes (128 x {d} x "
          f"{ff}): {rate / 1e9:.1f} GFLOP/s, so at least {flops / rate:.1f} s for this arithmetic "
          f"(up to {steps} Adam steps over {cfg.n_prefixes + 1} contexts and the KL prompt, forward and backward)")
