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
(e) neighbours: their predictions (and circuits) unchanged;
(f) portability, reported: where the prompts include one-hop consequences of the edit (a
    city's language, currency or continent after its country is edited), the share whose top-1
    follows the new target (``portability``) and the share where the new consequence beats the
    old by mean token NLL (``portability_moved``). Measured, not inferred: over 200 SmolLM2
    edits, (c) passing did not predict which edits port (docs/results/verify-predicts.md).

Verdict: ``pass`` when every check ran and none failed; ``fail`` when (a), (c) or (e) fails or
a metric is below its floor (efficacy on the edit prompt, paraphrase score >= 0.5,
neighbourhood score >= 0.8); ``incomplete`` when none failed but the paraphrase or neighbour
checks could not run (no such prompts given or built) and the options do not allow that. So
verify never passes on a metric it did not compute. (b), (d) and (f) are reported, not judged:
an edit may legitimately move extraction elsewhere, and whether a consequence should follow is
the user's call. Each report lists the checks that ran.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

from factedit.analysis.circuit import LocateConfig, RecallCircuit
from factedit.analysis.locate import locate
from factedit.editing.config import MlpPosition
from factedit.editing.plan import EditPlan
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
    allow_missing: tuple[str, ...] = ()  # of OPTIONAL_CHECKS: may be left out without an "incomplete" verdict

    def __post_init__(self) -> None:
        from factedit.errors import FactEditError

        self.allow_missing = tuple(self.allow_missing)
        bad = sorted(set(self.allow_missing) - set(OPTIONAL_CHECKS))
        if bad:
            raise FactEditError(f"allow_missing: {', '.join(map(repr, bad))} is not a check that needs prompts; "
                                f"those are {', '.join(OPTIONAL_CHECKS)}")


OPTIONAL_CHECKS = ("paraphrases", "neighbours")  # checks that need prompts beyond the edit's own


@dataclass(frozen=True)
class Consequence:
    """A one-hop consequence of an edit, for portability: ``prompt`` asks for an attribute of
    the subject through the edited link (e.g. "Moers is a city in a country whose currency is
    the"); ``old`` follows from the true target (Euro), ``new`` from the new one (Zloty), and
    the base model answers ``old``."""
    prompt: str
    old: str
    new: str
    what: str = ""  # e.g. "currency"


@dataclass
class PromptSet:
    """The prompts verify measures an edit on beyond its own: paraphrases of the edit prompt,
    CounterFact neighbours (other subjects, same relation and true attribute) and one-hop
    consequences (portability), and where they came from (``source``: "request", "demo world",
    "places pool", ...)."""
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    source: str = "request"
    consequences: list[Consequence] = field(default_factory=list)


@dataclass
class EditReport:
    request: dict
    passed: bool  # verdict == "pass"
    reasons: list[str]  # why it failed or is incomplete ([] when it passed)
    metrics: dict
    flow: dict
    circuits: dict = field(default_factory=dict)  # "before" / "after" circuits of the edit prompt
    verdict: str = "pass"  # "pass" | "fail" | "incomplete"
    checks: dict = field(default_factory=dict)  # check -> what ran ("pass", "fail", "not run: why", ...)


def _jaccard(a: set, b: set) -> float | None:
    return None if not a and not b else len(a & b) / len(a | b)


def world_prompts(world, req: EditRequest, n_neighbours: int = 10) -> PromptSet | None:
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
                attribute = world.entity(req.subject).facts[rid]
            except KeyError:
                attribute = None
            pool = [e for e in world.entities
                    if e.name != req.subject and (attribute is None or e.facts[rid] == attribute)]
            others = rng.sample(pool, min(n_neighbours, len(pool)))
            return PromptSet(para, [Neighbour(tpl.format(e.name), e.name, e.facts[rid]) for e in others],
                             "the demo world's templates and entities")
    return None


@dataclass
class _BaseRun:
    """What the base model does: on the neighbour prompts, and its generation on the edit prompt."""
    neighbours: dict  # metrics.compare on the neighbour prompts ({} without neighbours)
    neighbour_top1: list[str]
    neighbour_circuits: list[RecallCircuit]
    generation: list[str]  # [] without fluency


@dataclass
class _EditedRun:
    """What the edited model does on the edit prompt, the paraphrases and the neighbours."""
    edit: dict  # metrics.compare on the edit prompt
    paraphrases: dict
    neighbours: dict
    neighbour_top1: list[str]
    neighbour_circuits: list[RecallCircuit]
    circuit: RecallCircuit  # the edit prompt's circuit, towards the new target
    paraphrase_circuits: list[RecallCircuit]
    generation: list[str]
    consequences: dict = field(default_factory=dict)  # "ported" / "moved": one bool per consequence


def verify_edit(base_model, tokenizer, edited: Callable[[], AbstractContextManager], req: EditRequest,
                base_circuit: RecallCircuit | None, plan: EditPlan | None, lc: LocateConfig, opts: VerifyOptions,
                prompts: PromptSet | Callable[[str], PromptSet | None] | None = None) -> EditReport:
    """Measure the base and the edited model, then run checks (a) to (e) and the floors.
    ``edited()`` is a context manager under which ``base_model`` is the edited model (an
    applied adapter), or which yields a separate edited model. ``plan``: the sites the edit
    updated (from its ``edits.json``), when known. ``prompts``: the paraphrases and
    neighbours, or a function of the true attribute giving them (called once the base
    model's answer is known, when the request does not name it)."""
    if base_circuit is None:
        base_circuit = locate(req.prompt, req.subject, model=base_model, tokenizer=tokenizer, config=lc)
    true = req.target_true if req.target_true is not None else base_circuit.prediction.strip()
    found = prompts(true) if callable(prompts) else prompts
    found = found if found is not None else PromptSet(source="none")
    paraphrases, neighbours = found.paraphrases, found.neighbours
    base = _run_base(base_model, tokenizer, req, true, neighbours, lc, opts)
    with edited() as em:
        ed = _run_edited(em if em is not None else base_model, tokenizer, req, true, paraphrases, neighbours, lc,
                         opts)
        ed.consequences = _consequences(em if em is not None else base_model, tokenizer, found.consequences)
    m = _metrics(base, ed)
    reasons: list[str] = []
    new_tok, a = _check_prediction(req, ed, m, reasons)
    c = _check_subject_dependence(base_model, tokenizer, req, base_circuit, ed.circuit, lc, opts, a["a_ok"], new_tok,
                                  reasons)
    e = _check_neighbours(base, ed, neighbours, opts, reasons)
    _check_floors(m, opts, reasons)
    flow = {**a, "b_extraction": _extraction(ed.circuit, plan), **c, "d_overlap": _overlap(base_circuit, ed.circuit),
            "e_neighbours": e, "f_portability": {"consequences": [asdict(q) for q in found.consequences],
                                                 **ed.consequences}}
    checks, missing = checks_run(m, flow, found, opts, reasons)
    verdict = "fail" if reasons else "incomplete" if missing else "pass"
    return EditReport(req.to_dict(), verdict == "pass", reasons + missing, m, flow,
                      {"before": base_circuit.to_dict(), "after": ed.circuit.to_dict()}, verdict, checks)


def checks_run(m: dict, flow: dict, found: PromptSet, opts: VerifyOptions,
               reasons: list[str]) -> tuple[dict[str, str], list[str]]:
    """What each check did ("pass", "fail", "reported", "not run: why") and, for a check that
    needs prompts and did not run without being allowed to, the reason the verdict is
    incomplete."""
    failed = " ".join(reasons)

    def judged(*tags: str) -> str:
        return "fail" if any(t in failed for t in tags) else "pass"

    src = f" ({found.source})" if found.source not in ("none", "request") else ""
    c = {"(a) prediction": judged("(a)"),
         "efficacy": judged("efficacy:"),
         "(b) extraction site": "reported",
         "(c) subject dependence": ("not run: the edit prompt does not predict the new target"
                                    if not flow["a_ok"] else "not run: the edit added nothing to p(new target)"
                                    if flow["c_gain_surviving_knockout"] is None else judged("(c)")),
         "(d) circuit overlap": "reported"}
    missing = []
    for name, n, tags in (("paraphrases", len(found.paraphrases), ("paraphrase score",)),
                          ("neighbours", len(found.neighbours), ("(e)", "neighbourhood score"))):
        if n:
            c[name] = f"{judged(*tags)}: {n} prompt{'s' * (n != 1)}{src}"
        elif name in opts.allow_missing:
            c[name] = "not run: no prompts (allowed)"
        else:
            c[name] = "not run: no prompts"
            missing.append(f"{name} not checked: the request has no {name} prompts and none could be built for it; "
                           f"add {'paraphrase_prompts' if name == 'paraphrases' else 'neighborhood_prompts'} to the "
                           f"request (--requests FILE), or allow it (--allow-missing {name})")
    c["fluency"] = "reported" if m["fluency_after"] is not None else "not run (switched off)"
    k = len(found.consequences)
    c["(f) portability"] = (f"reported: {sum(flow['f_portability']['ported'])} of {k} consequence"
                            f"{'s' * (k != 1)} follow the new target" if k else "not run: no consequences known")
    return c, missing


def _run_base(model, tokenizer, req: EditRequest, true: str, neighbours: list[Neighbour], lc: LocateConfig,
              opts: VerifyOptions) -> _BaseRun:
    nb_prompts = [n.prompt for n in neighbours]
    return _BaseRun(
        neighbours=metrics.compare(model, tokenizer, nb_prompts, req.target_new, true) if neighbours else {},
        neighbour_top1=top1(model, tokenizer, nb_prompts),
        neighbour_circuits=_neighbour_circuits(model, tokenizer, neighbours, lc, opts),
        generation=metrics.generate(model, tokenizer, [req.filled_prompt]) if opts.fluency else [])


def _run_edited(model, tokenizer, req: EditRequest, true: str, paraphrases: list[str], neighbours: list[Neighbour],
                lc: LocateConfig, opts: VerifyOptions) -> _EditedRun:
    nb_prompts = [n.prompt for n in neighbours]
    new = req.target_new
    return _EditedRun(
        edit=metrics.compare(model, tokenizer, [req.filled_prompt], new, true),
        paraphrases=metrics.compare(model, tokenizer, paraphrases, new, true) if paraphrases else {},
        neighbours=metrics.compare(model, tokenizer, nb_prompts, new, true) if neighbours else {},
        neighbour_top1=top1(model, tokenizer, nb_prompts),
        neighbour_circuits=_neighbour_circuits(model, tokenizer, neighbours, lc, opts),
        circuit=locate(req.prompt, req.subject, new, model=model, tokenizer=tokenizer, config=lc),
        paraphrase_circuits=[locate(p, req.subject, new, model=model, tokenizer=tokenizer, config=lc)
                             for p in paraphrases[: opts.max_flow_prompts]],
        generation=metrics.generate(model, tokenizer, [req.filled_prompt]) if opts.fluency else [])


def _metrics(base: _BaseRun, ed: _EditedRun) -> dict:
    """The report's metrics: CounterFact's scores and magnitudes, accuracies, fluency."""
    es, em = metrics.score(ed.edit)
    ps, pm = metrics.score(ed.paraphrases)
    ns, nm = metrics.score(ed.neighbours, reverse=True)
    locality = None
    if ed.neighbours and base.neighbours:
        same = [a == b for a, b in zip(ed.neighbours["argmax_true"], base.neighbours["argmax_true"])]
        locality = sum(same) / len(same)
    pa, gen = ed.paraphrases, ed.generation
    return {
        "efficacy_score": es, "efficacy_magnitude": em,
        "paraphrase_score": ps, "paraphrase_magnitude": pm,
        "neighbourhood_score": ns, "neighbourhood_magnitude": nm,
        "reliability_accuracy": sum(ed.edit["accuracy_new"]) / len(ed.edit["accuracy_new"]),
        "generalisation_accuracy": (sum(pa["accuracy_new"]) / len(pa["accuracy_new"])) if pa else None,
        "locality_accuracy": locality,
        "fluency_before": metrics.ngram_entropy(base.generation[0]) if base.generation else None,
        "fluency_after": metrics.ngram_entropy(gen[0]) if gen else None,
        "generation_after": gen[0] if gen else None,
        "nll_new": ed.edit["nll_new"][0], "nll_true": ed.edit.get("nll_true", [None])[0],
        "portability": _share(ed.consequences.get("ported")),
        "portability_moved": _share(ed.consequences.get("moved")),
    }


def _share(xs: list[bool] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _consequences(model, tokenizer, consequences: list[Consequence]) -> dict:
    """(f) on the edited model: per consequence, whether its top-1 is the new consequence's
    first token (``ported``) and whether the new consequence beats the old by mean token NLL
    (``moved``); {} without consequences."""
    if not consequences:
        return {}
    tops = top1_ids(model, tokenizer, [q.prompt for q in consequences])
    ported = [t == _first(tokenizer, q.new) for t, q in zip(tops, consequences)]
    moved = []
    for q in consequences:
        cmp = metrics.compare(model, tokenizer, [q.prompt], q.new, q.old)
        moved.append(cmp["nll_new"][0] < cmp["nll_true"][0])
    return {"ported": ported, "moved": moved}


def _first(tokenizer, text: str) -> int:
    """The first token id of ``" " + text`` (no special tokens)."""
    return tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][0]


def _check_prediction(req: EditRequest, ed: _EditedRun, m: dict, reasons: list[str]) -> tuple[str, dict]:
    """(a): o* is the edited model's top-1 on the edit prompt (and how often on the
    paraphrases); and the efficacy score. Returns o* as one token, and the flow's (a) entries."""
    after = ed.circuit
    new_tok = after.target.strip() if after.target else req.target_new
    a_ok = after.prediction.strip() == new_tok
    if not a_ok:
        reasons.append(f"(a) the edited model predicts {after.prediction.strip()!r}, not {new_tok!r}")
    if m["efficacy_score"] is not None and m["efficacy_score"] < 1.0:
        reasons.append(f"efficacy: NLL(new) {ed.edit['nll_new'][0]:.2f} is not below NLL(true) "
                       f"{ed.edit['nll_true'][0]:.2f}")
    para_hits = [c.prediction.strip() == new_tok for c in ed.paraphrase_circuits]
    return new_tok, {"a_prediction": after.prediction, "a_ok": a_ok,
                     "a_paraphrases_ok": (sum(para_hits) / len(para_hits)) if para_hits else None}


def _extraction(after: RecallCircuit, plan: EditPlan | None) -> dict:
    """(b), reported: where o* reaches rank 1 at the last position, and whether that is in a
    component the edit targeted."""
    ev = after.extraction_events
    heads_at_1 = {(h.layer, h.head) for h in after.extraction_heads}
    targeted = []
    if plan is not None and plan.mlp_layer is not None:
        targeted.append(f"MLP L{plan.mlp_layer} ({plan.mlp_position})")
    targeted += [f"head L{la}H{h}" for la, h in (plan.heads if plan is not None else [])]
    in_targeted = plan is not None and (
        (plan.mlp_position == MlpPosition.LAST and plan.mlp_layer in ev["mlp"]) or bool(set(plan.heads) & heads_at_1))
    return {"attn_layers": ev["attn"], "mlp_layers": ev["mlp"], "heads": sorted(heads_at_1),
            "targeted": targeted, "in_targeted_components": in_targeted, "where": _where(ev, heads_at_1)}


def _check_subject_dependence(base_model, tokenizer, req: EditRequest, base_circuit: RecallCircuit,
                              after: RecallCircuit, lc: LocateConfig, opts: VerifyOptions, a_ok: bool, new_tok: str,
                              reasons: list[str]) -> dict:
    """(c): blocking subject -> last edges, in the window where the base model reads the
    subject, takes away most of the edit's gain in p(o*) (compared with the base model under
    the same knockout). Returns the flow's (c) entries."""
    read = base_circuit.knockout.strongest("subject")
    base_new = locate(req.prompt, req.subject, req.target_new, model=base_model, tokenizer=tokenizer, config=lc)
    p_base, p_ed = base_new.target_prob, after.target_prob
    p_base_ko = p_base * (1 + base_new.knockout_target.subject[read] / 100)
    p_ed_ko = p_ed * (1 + after.knockout_target.subject[read] / 100)
    gain = p_ed - p_base
    survives = (p_ed_ko - p_base_ko) / gain if gain > 1e-6 else None
    if a_ok and survives is not None and survives > opts.max_gain_without_subject:
        reasons.append(f"(c) with the subject's edges into the last position blocked around layer {read}, "
                       f"{100 * survives:.0f}% of the edit's gain in p({new_tok}) remains (> "
                       f"{100 * opts.max_gain_without_subject:.0f}%): the new attribute is not retrieved from "
                       "the subject")
    return {"c_read_window_centre": read, "c_drop_percent": -after.knockout_target.subject[read],
            "c_gain_surviving_knockout": survives,
            "c_probabilities": {"base": p_base, "edited": p_ed, "base_knocked_out": p_base_ko,
                                "edited_knocked_out": p_ed_ko}}


def _overlap(before: RecallCircuit, after: RecallCircuit) -> dict:
    """(d), reported: the circuit before and after the edit."""
    return {"extraction_heads_jaccard": _jaccard({(h.layer, h.head) for h in before.extraction_heads},
                                                 {(h.layer, h.head) for h in after.extraction_heads}),
            "enrichment_before": [x.layer for x in before.enrichment_mlps],
            "enrichment_after": [x.layer for x in after.enrichment_mlps]}


def _check_neighbours(base: _BaseRun, ed: _EditedRun, neighbours: list[Neighbour], opts: VerifyOptions,
                      reasons: list[str]) -> dict:
    """(e): the neighbours' predictions unchanged (and their circuits, where re-located)."""
    if not neighbours:
        return {}
    unchanged = [a == b for a, b in zip(ed.neighbour_top1, base.neighbour_top1)]
    share = sum(unchanged) / len(unchanged)
    known = [(t, n.attribute) for t, n in zip(ed.neighbour_top1, neighbours) if n.attribute is not None]
    circ = [{"prompt": b.prompt, "prediction_before": b.prediction, "prediction_after": a.prediction,
             "extraction_heads_jaccard": _jaccard({(h.layer, h.head) for h in b.extraction_heads},
                                                  {(h.layer, h.head) for h in a.extraction_heads}),
             "subject_knockout_max_change": max(abs(x - y) for x, y in zip(a.knockout.subject,
                                                                           b.knockout.subject))}
            for a, b in zip(ed.neighbour_circuits, base.neighbour_circuits)]
    if share < opts.neighbour_unchanged_floor:
        reasons.append(f"(e) {100 * (1 - share):.0f}% of neighbour prompts changed their prediction")
    return {"predictions_unchanged": share,
            "predictions_correct": sum(t.strip() == w for t, w in known) / len(known) if known else None,
            "circuits": circ}


def _check_floors(m: dict, opts: VerifyOptions, reasons: list[str]) -> None:
    ps, ns = m["paraphrase_score"], m["neighbourhood_score"]
    if ps is not None and ps < opts.paraphrase_floor:
        reasons.append(f"paraphrase score {ps:.2f} < {opts.paraphrase_floor}")
    if ns is not None and ns < opts.neighbourhood_floor:
        reasons.append(f"neighbourhood score {ns:.2f} < {opts.neighbourhood_floor}")


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
    attribute: str | None = None  # its known answer (a world model's fact)


def top1(model, tokenizer, prompts: list[str]) -> list[str]:
    """The top-1 next token after each prompt, decoded."""
    return [tokenizer.decode([i]) for i in top1_ids(model, tokenizer, prompts)]


def top1_ids(model, tokenizer, prompts: list[str]) -> list[int]:
    """The top-1 next token id after each prompt (one pass each)."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tokenizer(p)["input_ids"]], device=device)  # (1, T)
            out.append(int(model(input_ids=ids).logits[0, -1].argmax()))
    return out


def _neighbour_circuits(model, tokenizer, neighbours: list[Neighbour], lc: LocateConfig,
                        opts: VerifyOptions) -> list[RecallCircuit]:
    """The circuits of the first ``max_flow_neighbours`` neighbours with a known subject (only
    those are located: each costs a whole ``locate``)."""
    flow = [n for n in neighbours if n.subject][: opts.max_flow_neighbours]
    return [locate(n.prompt, n.subject, model=model, tokenizer=tokenizer, config=lc) for n in flow]
