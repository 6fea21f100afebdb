"""The demo's real-model part: the paper's picture on SmolLM2-135M (a named model from the
package registry), beside the demo world's.

Known facts are taken from the bundled known_1000 in file order (a fact is known when the
model's top-1 token is the attribute's first token, as in the paper) until ``n_known`` are
found; each gets the attention-knockout sweep, and the means with 95% bands (1.96 standard
errors) make the figure. One fact gets its whole recall circuit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from factedit.analysis.knockout import SOURCE_SETS, attention_knockout, strongest_layer
from factedit.analysis.locate import config_for_model, locate
from factedit.analysis.rerun import clean_run
from factedit.analysis.spans import tokenize_with_subject
from factedit.audit.dataset import bundled
from factedit.models.adapter import ModelLayout
from factedit.models.loading import load_model
from factedit.plots import circuit_figures, knockout_figure, knockout_panels


def mean_band(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per layer: the mean over rows and 1.96 standard errors (0 for a single row)."""
    n = len(rows)
    mean = [sum(col) / n for col in zip(*rows)]
    if n < 2:
        return mean, [0.0] * len(mean)
    sd = [math.sqrt(sum((x - m) ** 2 for x in col) / (n - 1)) for col, m in zip(zip(*rows), mean)]
    return mean, [1.96 * s / math.sqrt(n) for s in sd]


@torch.no_grad()
def run_real_demo(name: str, out: Path, world_knockout: dict[str, list[float]], world_window: int,
                  n_known: int = 60, echo: Callable[[str], None] = print) -> dict:
    model, tok = load_model(name)
    adapter = ModelLayout(model)
    cfg = config_for_model(model).resolved(adapter.n_layers)
    L, k = adapter.n_layers, cfg.knockout_window
    echo(f"\n--- the paper's picture on a real model: {name} ({L} layers) ---")
    records = json.loads(bundled("known_1000").read_text())
    curves: dict[str, list[list[float]]] = {s: [] for s in SOURCE_SETS}
    first, scanned = None, 0
    for rec in records:
        if len(curves["subject"]) >= n_known:
            break
        scanned += 1
        tp = tokenize_with_subject(tok, rec["prompt"], rec["subject"])
        clean = clean_run(adapter, tp.input_ids)
        want = tok(" " + rec["attribute"], add_special_tokens=False)["input_ids"][0]
        if int(clean.logits.argmax()) != want:
            continue
        ko = attention_knockout(adapter, tp, k, clean=clean)
        for s in SOURCE_SETS:
            curves[s].append(ko.curves.curve(s))
        first = first or rec
    n = len(curves["subject"])
    mean, band = {}, {}
    for s in SOURCE_SETS:
        mean[s], band[s] = mean_band(curves[s])
    strongest = {s: strongest_layer(mean[s]) for s in SOURCE_SETS}
    echo(f"{n} of the first {scanned} known_1000 facts are known; mean knockout (window {k}):")
    for s in SOURCE_SETS:
        echo(f"  block {s:12s}-> last: strongest at layer {strongest[s]} ({mean[s][strongest[s]]:+.0f}%)")
    if strongest["non_subject"] < strongest["subject"]:
        echo("  relation edges matter before subject edges, as the paper found for GPT-2 and GPT-J")
    d = out / name
    knockout_figure(mean, k, d / "knockout.png", bands=band,
                    title=f"{name}: attention knockout, mean over {n} known facts (95% band)")
    knockout_panels([(f"demo world (window {world_window})", world_knockout, None, world_window),
                     (f"{name}, {n} known_1000 facts (window {k})", mean, band, k)],
                    out / "knockout_side_by_side.png")
    circuit = locate(first["prompt"], first["subject"], model=model, tokenizer=tok, config=cfg)
    echo(f"recall circuit of one fact:\n{circuit.summary()}")
    circuit.save(d / "circuit" / "circuit.json")
    circuit_figures(circuit, d / "circuit")
    echo(f"wrote {d}/knockout.png, {d}/circuit/ and {out}/knockout_side_by_side.png")
    return {"model": name, "n_known": n, "scanned": scanned, "window": k, "knockout_mean": mean,
            "knockout_band": band, "strongest_layer": strongest, "circuit_fact": first["prompt"]}
