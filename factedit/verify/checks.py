"""`verify`: score each edit and rerun the flow analysis on the edited model.

Per edit, with o* the new target and o^c the true one:

(a) prediction: o* is the edited model's top-1 on the edit prompt;
(b) extraction: where o* now reaches rank 1 at the last position (MHSA / MLP sublayers, heads),
    and whether that is in a component the edit targeted;
(c) subject dependence: blocking subject -> last edges in the window where the base model
    reads the subject takes away at least half of what the edit added to p(o*): with the
    subject hidden, p_edited(o*) - p_base(o*) (both under that knockout) is at most half of
    the edit's gain p_edited(o*) - p_base(o*). So o* is retrieved from the subject and not
    written at the last position whatever the subject. (Comparing with the base model under
    the same knockout matters when o* is what the model guesses without any subject.)
(d) overlap of the circuit before and after: Jaccard of the extraction heads, enrichment layers;
(e) neighbours: their predictions (and circuits) unchanged.

Verdict: pass unless (a), (c) or (e) fails, or a metric is below its floor (efficacy on the
edit prompt, paraphrase score >= 0.5, neighbourhood score >= 0.8, where those prompts exist).
(b) and (d) are reported, not judged: an edit may legitimately move extraction elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from factedit.analysis.circuit import LocateConfig, RecallCircuit
from factedit.analysis.locate import locate
from factedit.editing.requests import EditRequest
from factedit.verify import metrics


@dataclass
class VerifyOptions:
    max_gain_without_subject: float = 0.5  # share of the edit's gain allowed to survive subject knockout
    paraphrase_floor: float = 0.5
    neighbourhood_floor: float = 0.8
    neighbour_unchanged_floor: float = 0.9
    max_flow_prompts: int = 3  # paraphrases re-located per edit
    max_flow_neighbours: int = 3
    fluency: bool = True


@dataclass
class EditReport:
    request: dict
    passed: bool
    reasons: list[str]
    metrics: dict
    flow: dict
    circuits: dict = field(default_factory=dict)  # "before" / "after" circuits of the edit prompt


def _jaccard(a: set, b: set) -> float | None:
    return None if not a and not b else len(a & b) / len(a | b)


def world_prompts(world, req: EditRequest, n_neighbours: int = 10) -> tuple[list[str], list[Neighbour]]:
    """For a world model: paraphrases (the relation's other templates) and neighbours: other
    entities that share the subject's true attribute for the relation (CounterFact's
    neighbourhood: same relation and object, other subject). Empty when the request's prompt
    is not one of the world's templates."""
    import random

    for rid, rel in world.relations.items():
        temps = rel.templates + rel.heldout_templates
        if req.prompt in temps or any(t.format(req.subject) == req.filled_prompt for t in temps):
            tpl = req.prompt if "{}" in req.prompt else next(t for t in temps if t.format(req.subject) == req.prompt)
            para = [t.format(req.subject) for t in temps if t != tpl]
            rng = random.Random(req.subject)
            try:
                truth = world.entity(req.subject).facts[rid]
            except KeyError:
                truth = None
            pool = [e for e in world.entities if e.name != req.subject and (truth is None or e.facts[rid] == truth)]
            others = rng.sample(pool, min(n_neighbours, len(pool)))
            return para, [Neighbour(tpl.format(e.name), e.name, e.facts[rid]) for e in others]
    return [], []


def verify_edit(base_model, tok, edited: Callable[[], AbstractContextManager], req: EditRequest,
                base_circuit: RecallCircuit | None, plan: dict | None, lc: LocateConfig, opts: VerifyOptions,
                paraphrases: list[str], neighbours: list[Neighbour]) -> EditReport:
    """``edited()`` is a context manager under which ``base_model`` is the edited model (an
    applied adapter), or which yields a separate edited model."""
    reasons: list[str] = []
    prompt = req.filled_prompt
    true = req.target_true
    if base_circuit is None:
        base_circuit = locate(req.prompt, req.subject, model=base_model, tokenizer=tok, config=lc)
    if true is None:
        true = base_circuit.prediction.strip()
    nb_prompts = [n.prompt for n in neighbours]
    base_nb = metrics.compare(base_model, tok, nb_prompts, req.target_new, true) if neighbours else {}
    base_nb_top = top1(base_model, tok, nb_prompts)
    base_nb_circ = _neighbour_circuits(base_model, tok, neighbours, lc, opts)
    base_gen = metrics.generate(base_model, tok, [prompt]) if opts.fluency else []
    with edited() as em:
        model = em if em is not None else base_model
        ed = metrics.compare(model, tok, [prompt], req.target_new, true)
        pa = metrics.compare(model, tok, paraphrases, req.target_new, true) if paraphrases else {}
        nb = metrics.compare(model, tok, nb_prompts, req.target_new, true) if neighbours else {}
        nb_top = top1(model, tok, nb_prompts)
        nb_circ = _neighbour_circuits(model, tok, neighbours, lc, opts)
        after = locate(req.prompt, req.subject, req.target_new, model=model, tokenizer=tok, config=lc)
        para_circuits = [locate(p, req.subject, req.target_new, model=model, tokenizer=tok, config=lc)
                         for p in paraphrases[: opts.max_flow_prompts]]
        gen = metrics.generate(model, tok, [prompt]) if opts.fluency else []
    es, em_ = metrics.score(ed)
    ps, pm = metrics.score(pa)
    ns, nm = metrics.score(nb, reverse=True)
    locality = None
    if nb and base_nb:
        same = [a == b for a, b in zip(nb["argmax_true"], base_nb["argmax_true"])]
        locality = sum(same) / len(same)
    m = {
        "efficacy_score": es, "efficacy_magnitude": em_,
        "paraphrase_score": ps, "paraphrase_magnitude": pm,
        "neighbourhood_score": ns, "neighbourhood_magnitude": nm,
        "reliability_accuracy": sum(ed["accuracy_new"]) / len(ed["accuracy_new"]),
        "generalisation_accuracy": (sum(pa["accuracy_new"]) / len(pa["accuracy_new"])) if pa else None,
        "locality_accuracy": locality,
        "fluency_before": metrics.ngram_entropy(base_gen[0]) if base_gen else None,
        "fluency_after": metrics.ngram_entropy(gen[0]) if gen else None,
        "generation_after": gen[0] if gen else None,
        "nll_new": ed["nll_new"][0], "nll_true": ed.get("nll_true", [None])[0],
    }

    # (a) prediction
    new_tok = after.target.strip() if after.target else req.target_new
    a_ok = after.prediction.strip() == new_tok
    if not a_ok:
        reasons.append(f"(a) the edited model predicts {after.prediction.strip()!r}, not {new_tok!r}")
    if es is not None and es < 1.0:
        reasons.append(f"efficacy: NLL(new) {ed['nll_new'][0]:.2f} is not below NLL(true) {ed['nll_true'][0]:.2f}")
    para_hits = [c.prediction.strip() == new_tok for c in para_circuits]
    # (b) extraction of o*
    ev = after.extraction_events
    heads_at_1 = {(h.layer, h.head) for h in after.extraction_heads}
    targeted = []
    if plan and plan.get("mlp_layer") is not None:
        la = plan["mlp_layer"]
        targeted.append(f"MLP L{la} ({plan.get('mlp_position', 'subject')})")
    targeted += [f"head L{la}H{h}" for la, h in (plan or {}).get("heads", [])]
    in_targeted = bool(plan and plan.get("mlp_position") == "last" and plan.get("mlp_layer") in ev["mlp"]) or bool(
        plan and {tuple(x) for x in plan.get("heads", [])} & heads_at_1)
    b = {"attn_layers": ev["attn"], "mlp_layers": ev["mlp"], "heads": sorted(heads_at_1),
         "targeted": targeted, "in_targeted_components": in_targeted,
         "where": _where(ev, heads_at_1)}
    # (c) subject dependence, in the window where the base model reads the subject
    read = base_circuit.knockout.strongest("subject")
    base_new = locate(req.prompt, req.subject, req.target_new, model=base_model, tokenizer=tok, config=lc)
    p_base, p_ed = base_new.target_prob, after.target_prob
    p_base_ko = p_base * (1 + base_new.knockout_target.subject[read] / 100)
    p_ed_ko = p_ed * (1 + after.knockout_target.subject[read] / 100)
    drop = -after.knockout_target.subject[read]
    gain = p_ed - p_base
    survives = (p_ed_ko - p_base_ko) / gain if gain > 1e-6 else None
    if a_ok and survives is not None and survives > opts.max_gain_without_subject:
        reasons.append(f"(c) with the subject's edges into the last position blocked around layer {read}, "
                       f"{100 * survives:.0f}% of the edit's gain in p({new_tok}) remains (> "
                       f"{100 * opts.max_gain_without_subject:.0f}%): the new attribute is not retrieved from "
                       "the subject")
    # (d) overlap
    before_heads = {(h.layer, h.head) for h in base_circuit.extraction_heads}
    d = {"extraction_heads_jaccard": _jaccard(before_heads, heads_at_1),
         "enrichment_before": [x.layer for x in base_circuit.enrichment_mlps],
         "enrichment_after": [x.layer for x in after.enrichment_mlps]}
    # (e) neighbours
    e = {}
    if neighbours:
        unchanged = [a == b_ for a, b_ in zip(nb_top, base_nb_top)]
        share = sum(unchanged) / len(unchanged)
        truths = [(t, n.truth) for t, n in zip(nb_top, neighbours) if n.truth is not None]
        circ = [{"prompt": b_.prompt, "prediction_before": b_.prediction, "prediction_after": a.prediction,
                 "extraction_heads_jaccard": _jaccard({(h.layer, h.head) for h in b_.extraction_heads},
                                                      {(h.layer, h.head) for h in a.extraction_heads}),
                 "subject_knockout_max_change": max(abs(x - y) for x, y in zip(
                     a.knockout.subject, b_.knockout.subject))}
                for a, b_ in zip(nb_circ, base_nb_circ)]
        e = {"predictions_unchanged": share,
             "predictions_correct": sum(t.strip() == w for t, w in truths) / len(truths) if truths else None,
             "circuits": circ}
        if share < opts.neighbour_unchanged_floor:
            reasons.append(f"(e) {100 * (1 - share):.0f}% of neighbour prompts changed their prediction")
    if ps is not None and ps < opts.paraphrase_floor:
        reasons.append(f"paraphrase score {ps:.2f} < {opts.paraphrase_floor}")
    if ns is not None and ns < opts.neighbourhood_floor:
        reasons.append(f"neighbourhood score {ns:.2f} < {opts.neighbourhood_floor}")
    flow = {"a_prediction": after.prediction, "a_ok": a_ok,
            "a_paraphrases_ok": (sum(para_hits) / len(para_hits)) if para_hits else None,
            "b_extraction": b, "c_read_window_centre": read, "c_drop_percent": drop,
            "c_gain_surviving_knockout": survives,
            "c_probabilities": {"base": p_base, "edited": p_ed, "base_knocked_out": p_base_ko,
                                "edited_knocked_out": p_ed_ko},
            "d_overlap": d, "e_neighbours": e}
    return EditReport(req.to_dict(), not reasons, reasons, m, flow,
                      {"before": base_circuit.to_dict(), "after": after.to_dict()})


def _where(ev: dict, heads: set) -> str:
    parts = []
    if ev["mlp"]:
        parts.append("MLP layers " + ", ".join(map(str, ev["mlp"])))
    if ev["attn"]:
        parts.append("MHSA layers " + ", ".join(map(str, ev["attn"])))
    if heads:
        parts.append("heads " + ", ".join(f"L{la}H{h}" for la, h in sorted(heads)))
    return "; ".join(parts) or "no single sublayer or head (built up gradually in the residual stream)"


@dataclass
class Neighbour:
    prompt: str
    subject: str | None = None  # known for world models: then its circuit is compared too
    truth: str | None = None


def top1(model, tok, prompts: list[str]) -> list[str]:
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]], device=device)
            out.append(tok.decode([int(model(input_ids=ids).logits[0, -1].argmax())]))
    return out


def _neighbour_circuits(model, tok, neighbours: list[Neighbour], lc, opts) -> list[RecallCircuit]:
    return [locate(n.prompt, n.subject, model=model, tokenizer=tok, config=lc)
            for n in neighbours if n.subject][: opts.max_flow_neighbours]
