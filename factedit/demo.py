"""`factedit demo`: what the embedded demo model knows and how it recalls it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from factedit.io import atomic_write_text, dumps_json
from factedit.models.loading import load_model
from factedit.paths import world_file
from factedit.plots import attribute_rate_figure, head_heatmap, knockout_figure
from factedit.studies.world_mechanism import measure_mechanism
from factedit.world.evaluate import evaluate_recall
from factedit.world.generate import World


@torch.no_grad()
def run_demo(model_path: str | None, out: str | Path, n_facts: int = 8,
             echo: Callable[[str], None] = print, real_model: str | None = "smollm2-135m") -> dict:
    """The whole demo into ``out``: examples, recall, the mechanism, one fact's circuit, its edit
    and verification, an audit slice, then the real model's flow (``real_model``). Returns
    what it writes to ``out/demo.json``."""
    from factedit.models.zoo import model_dir
    from factedit.paths import check_output_dir

    # before any work: never the model's folder, never a file; the demo rewrites its own files in OUT
    check_output_dir(out, True, model_dir(model_path))
    if real_model:
        from factedit.models.zoo import pull

        pull(real_model, echo=echo)  # an unknown name fails here, before any work
    out = Path(out)
    model, tok = load_model(model_path)
    world = World.load(model.name_or_path)
    echo(f"model: {model.name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
         f"parameters, {model.config.n_layer} layers)")
    echo(f"world: {len(world.entities)} entities, {len(world.relations)} relations "
         f"({', '.join(world.relations)})\n")
    rows = _examples(model, tok, world, n_facts, echo)
    rec = evaluate_recall(model, tok, world, max_entities=200)
    echo(f"\nrecall on 200 entities: training templates {rec['recall_train_templates']:.1%}, "
         f"held-out templates {rec['recall_heldout_templates']:.1%}")
    mech, window = _mechanism(model, tok, world, out, echo)
    circuit = _circuit(model, tok, rows[0], out, echo)
    req, report = _edit_and_verify(model, tok, world, rows[0], out, echo)
    audit = _audit(model, tok, world, out, echo)
    result = {"examples": rows, "recall": rec, "mechanism": mech.summary(), "circuit": circuit.to_dict(),
              "edit": {"request": req.to_dict(), "verify": asdict(report.summary)},
              "audit": {k: audit[k] for k in ("facts", "known", "subject_knockout_strongest_layer", "hubs")}}
    if real_model:
        from factedit.demo_real import run_real_demo

        result["real_model"] = run_real_demo(real_model, out, mech.knockout, window, echo=echo)
    atomic_write_text(out / "demo.json", dumps_json(result, indent=1))
    echo(f"\nwrote {out / 'demo.json'}")
    return result


def _examples(model, tok, world: World, n_facts: int, echo: Callable[[str], None]) -> list[dict]:
    """``n_facts`` random prompts (half on held-out templates) and what the model predicts."""
    rng = random.Random(0)
    rows = []
    echo(f"{'prompt':58s} {'prediction':12s} {'p':>5s}  truth")
    for heldout in (False, True):
        pool = [e for e in world.entities if e.paraphrase_test] if heldout else world.entities
        for _ in range(n_facts // 2):
            e = rng.choice(pool)
            rid = rng.choice(list(world.relations))
            rel = world.relations[rid]
            prompt = rng.choice(rel.heldout_templates if heldout else rel.templates).format(e.name)
            p = model(input_ids=torch.tensor([tok.encode(prompt)])).logits[0, -1].softmax(-1)  # (V,)
            top = int(p.argmax())
            pred = tok.decode([top]).strip()
            mark = "ok" if pred == e.facts[rid] else "WRONG"
            tag = " (held-out template)" if heldout else ""
            echo(f"{prompt + tag:58s} {pred:12s} {float(p[top]):5.2f}  {e.facts[rid]} {mark}")
            rows.append({"prompt": prompt, "subject": e.name, "prediction": pred, "prob": float(p[top]),
                         "truth": e.facts[rid], "heldout_template": heldout})
    return rows


def _mechanism(model, tok, world: World, out: Path, echo: Callable[[str], None]):
    """The recall mechanism over 40 known facts, printed and drawn; (its report, the window)."""
    window = int(world.meta.get("recipe", {}).get("analysis", {}).get("knockout_window", 3))
    mech = measure_mechanism(model, tok, world, n_facts=40, window=window)
    s = mech.summary()
    echo(f"\nrecall mechanism over {s['n_facts']} known facts (knockout window {window}):")
    for name, curve in mech.knockout.items():
        echo(f"  block {name:12s}-> last, change of p(prediction) by layer: "
             + " ".join(f"{x:6.0f}%" for x in curve))
    echo("  attribute rate at the last subject token by layer (embeddings first): "
         + " ".join(f"{x:.2f}" for x in mech.attribute_rate))
    echo(f"  facts with an extraction head (a head's output alone ranks the attribute first): "
         f"{s['d_extraction_head_share']:.0%}")
    knockout_figure(mech.knockout, window, out / "knockout.png",
                    title=f"Attention knockout, mean over {s['n_facts']} demo facts")
    attribute_rate_figure({"own attributes": mech.attribute_rate,
                           "another entity's attributes (control)": mech.attribute_rate_control},
                          out / "attribute_rate.png")
    head_heatmap(mech.head_share, out / "extraction_heads.png",
                 title="Share of facts where the head alone ranks the attribute first",
                 label="share of facts")
    echo(f"wrote {out}/knockout.png, attribute_rate.png, extraction_heads.png")
    return mech, window


def _circuit(model, tok, example: dict, out: Path, echo: Callable[[str], None]):
    """One fact's recall circuit (`factedit locate`), saved with its figures."""
    from factedit.analysis.locate import locate
    from factedit.plots import circuit_figures

    circuit = locate(example["prompt"], example["subject"], model=model, tokenizer=tok)
    echo(f"\nrecall circuit of one fact (`factedit locate`):\n{circuit.summary()}")
    circuit.save(out / "circuit" / "circuit.json")
    circuit_figures(circuit, out / "circuit")
    echo(f"wrote {out}/circuit/: circuit.json and its figures")
    return circuit


def _edit_and_verify(model, tok, world: World, example: dict, out: Path, echo: Callable[[str], None]):
    """Edit the example's fact to another attribute of its relation, then verify the edit;
    (the request, the VerifyReport)."""
    from factedit.editing.api import edit as edit_facts
    from factedit.editing.requests import EditRequest
    from factedit.verify.run import verify, write_report

    ent = world.entity(example["subject"])
    rid = next(r for r, rel in world.relations.items()
               if any(t.format(ent.name) == example["prompt"] for t in rel.templates + rel.heldout_templates))
    new = next(a for a in world.relations[rid].attributes if a != ent.facts[rid])
    req = EditRequest(world.relations[rid].templates[0], ent.name, new, ent.facts[rid])
    echo(f"\nedit (`factedit edit`): {req.filled_prompt!r}: {ent.facts[rid]} -> {new}")
    res = edit_facts(req, model=model, tokenizer=tok, out=out / "edit", overwrite=True, progress=False)
    echo(f"  {res.plans[0].why}; wrote {out}/edit/ (PEFT adapter + edits.json) in {res.seconds:.1f} s")
    report = verify(model=model, tokenizer=tok, adapter=out / "edit")
    write_report(report, out / "verify")
    e = report.edits[0]
    m = e.metrics
    echo(f"verify (`factedit verify`): {'PASS' if e.passed else 'FAIL: ' + '; '.join(e.reasons)}; "
         f"efficacy {m['efficacy_score']:.2f}, paraphrase {m['paraphrase_score']:.2f}, "
         f"neighbourhood {m['neighbourhood_score']:.2f}; new attribute extracted at "
         f"{e.flow['b_extraction']['where']}; with the subject hidden, "
         f"{100 * (e.flow['c_gain_surviving_knockout'] or 0):.0f}% of the edit's gain remains")
    echo(f"  after the edit: {req.filled_prompt}{m['generation_after']}")
    echo(f"wrote {out}/verify/report.html")
    return req, report


def _audit(model, tok, world: World, out: Path, echo: Callable[[str], None]) -> dict:
    """Audit a slice of the world (`factedit audit --limit 160`): where the model retrieves its knowledge."""
    from factedit.analysis.locate import config_for_model
    from factedit.audit.dataset import world_facts
    from factedit.audit.run import run_audit, world_related

    audit_dir = out / "audit"
    a = run_audit(world_facts(world)[:160], model=model, tokenizer=tok, out=audit_dir, config=config_for_model(model),
                  dataset_name=f"world:{world_file(model)} (first 160 prompts)",
                  related_of=world_related(world, tok), overwrite=True, progress=False, log=lambda m: None)
    hubs = ", ".join(f"L{h['layer']}H{h['head']}" for h in a["hubs"][:3]) or "none"
    echo(f"\naudit (`factedit audit --limit 160`): {a['known']}/{a['facts']} prompts known; subject knockout "
         f"strongest at layer {a['subject_knockout_strongest_layer']}; most frequent extraction heads {hubs}")
    echo(f"wrote {audit_dir}/report.html, summary.json, facts.jsonl and figures")
    return a
