"""Where an edit writes: the sites planned for one fact from its recall circuit and the recipe
(the enrichment MLP at the subject, or at the last position for a lookup fact, and the
extraction heads), with the reason in words."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from factedit.analysis.circuit import RecallCircuit
from factedit.analysis.knockout import window_layers
from factedit.analysis.rerun import clean_run
from factedit.analysis.spans import tokenize_with_subject
from factedit.editing.config import EditConfig, MlpPosition, Scope
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError, shown
from factedit.models.adapter import ModelLayout


@dataclass
class EditPlan:
    mlp_layer: int | None
    heads: list[tuple[int, int]]  # (layer, query head)
    why: str  # where the sites came from
    mlp_position: MlpPosition = MlpPosition.SUBJECT  # "subject" (ROME's site) | "last" (a lookup MLP there)
    mechanism: str = ""  # "extraction" | "lookup", as read from the circuit
    read_layers: list[int] = field(default_factory=list)  # where the last position reads the subject
    # per head, where its value is written: tokens before the subject's last (0: the last one)
    head_offsets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mlp_position = MlpPosition.parse(self.mlp_position, "plan.mlp_position")

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> EditPlan:
        """A plan as ``edits.json`` holds it (``asdict``); only ``mlp_layer`` and ``heads`` are
        required, the rest take their defaults. A malformed one is a one-line error."""
        malformed = f"{where} is malformed (an object with 'mlp_layer' and 'heads' [[layer, head], ...])"
        if not isinstance(data, dict):
            raise FactEditError(f"{malformed}, not {shown(data)}")
        mlp, heads, read = data.get("mlp_layer"), data.get("heads", []), data.get("read_layers") or []
        if not (mlp is None or type(mlp) is int) or not isinstance(heads, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(type(x) is int for x in h) for h in heads):
            raise FactEditError(malformed)
        if not isinstance(read, list) or not all(type(x) is int for x in read):
            raise FactEditError(f"{where}.read_layers must be a list of layers, not {shown(read)}")
        offsets = data.get("head_offsets") or []
        if not isinstance(offsets, list) or not all(type(x) is int and x <= 0 for x in offsets):
            raise FactEditError(f"{where}.head_offsets must be a list of token offsets <= 0, not {shown(offsets)}")
        return cls(mlp, [(h[0], h[1]) for h in heads], str(data.get("why", "")),
                   MlpPosition.parse(data.get("mlp_position", MlpPosition.SUBJECT), f"{where}.mlp_position"),
                   str(data.get("mechanism", "")), list(read), list(offsets))


def mechanism_of(circuit: RecallCircuit, threshold: float) -> str:
    """"extraction" when blocking subject -> last edges hurts p(prediction) most in the upper
    half of the layers, by at least ``threshold`` % (the paper's mechanism: upper layers read
    the enriched subject); else "lookup" (the subject is read low down, and the fact is
    computed at the last position)."""
    ko = circuit.knockout.subject  # (L,)
    worst = circuit.knockout.strongest("subject")
    return "extraction" if worst >= len(ko) // 2 and ko[worst] <= -threshold else "lookup"


def plan_for(circuit: RecallCircuit | None, cfg: EditConfig, n_layers: int) -> EditPlan:
    """The sites to update for one fact, from its circuit (located on the fact as the model
    recalls it now) and the recipe."""
    cands = cfg.mlp_layers or list(range(n_layers))
    mlp, position, why = None, MlpPosition.SUBJECT, []
    mech = mechanism_of(circuit, cfg.extraction_threshold) if circuit is not None else "extraction"
    scope = Scope.parse(cfg.scope, "edit.site.scope") if cfg.method == "circuit" else Scope.BOTH
    if scope == Scope.RELATION and circuit is not None:
        return _relation_plan(circuit, mech, n_layers)
    lookup_mlp = None
    if cfg.method == "circuit" and mech == "lookup" and scope == Scope.SUBJECT:
        why.append("lookup mechanism, edited at the subject (edit.site.scope subject)")
    elif cfg.method == "circuit" and mech == "lookup" and cfg.lookup_position == MlpPosition.SUBJECT:
        read = window_layers(circuit.knockout.strongest("subject"), circuit.knockout.window, n_layers)[0]
        why.append(f"lookup mechanism (the subject is read at L{read}), edited at the subject "
                   "(edit.site.lookup_position)")
    elif cfg.method == "circuit" and mech == "lookup":
        # the MLP at the last position in the first block of the window where blocking the
        # subject's edges hurts most: the first MLP after the attention that reads the subject.
        # (Measured on the demo model: 100/100 single edits effective with this rule, 98.75/100
        # when taking the layer of the first MLP extraction event instead.)
        read_window = window_layers(circuit.knockout.strongest("subject"), circuit.knockout.window, n_layers)
        read = read_window[0]
        lookup_mlp = min(cands, key=lambda la: abs(la - read))
        if lookup_mlp < read:
            # no candidate MLP at or above the read: the last position there has not read the
            # subject yet, so the update would key on the template alone (every subject asked
            # this way, and no paraphrase); the subject's MLP (ROME's site) is edited instead
            why.append(f"lookup mechanism (the subject is read at L{read}), but no candidate MLP at or above it "
                       f"(mlp_layers {cands}): edited at the subject")
            lookup_mlp = None
    if lookup_mlp is not None:
        position, mlp = MlpPosition.LAST, lookup_mlp
        events = circuit.extraction_events["mlp"]
        why.append(f"lookup mechanism (the subject is read low down, at L{read}): last-position MLP L{mlp}"
                   + (f"; MLP extraction events at L{events}" if events else ""))
    elif cfg.method in ("circuit", "mlp") and cfg.mlp_site == "trace" and circuit is not None \
            and circuit.trace is not None:
        t = circuit.trace  # traced at one position, the last subject token
        mlp = t.best_layer(t.positions[0], cands)
        why.append(f"subject MLP L{mlp}: largest causal-tracing indirect effect ({t.effect[mlp][0]:+.3f})"
                   + (f" among layers {cands}" if cfg.mlp_layers else ""))
    elif cfg.method in ("circuit", "mlp"):
        located = circuit.enrichment_mlps[0].layer if circuit and circuit.enrichment_mlps else None
        if cfg.mlp_site == "trace" and circuit is not None:
            why.append("the circuit holds no causal trace (locate with analysis.trace: true)")
        if located is None:
            mlp = cands[0]
            why.append(f"subject MLP L{mlp}: no enrichment MLP located, first candidate layer")
        else:
            mlp = min(cands, key=lambda la: abs(la - located))
            why.append(f"subject MLP L{mlp}: " + ("located enrichment MLP" if mlp == located
                                                  else f"candidate nearest to the located L{located}"))
    heads: list[tuple[int, int]] = []
    # heads: in the extraction mechanism (or when asked for alone); in a lookup the heads read
    # raw subject tokens shared with other subjects, so a value edit there would not be specific
    if scope == Scope.SUBJECT:
        why.append("no heads (edit.site.scope subject)")
    elif circuit is not None and (cfg.method == "heads" or (cfg.method == "circuit" and mech == "extraction")):
        if circuit.extraction_heads:
            heads = [(h.layer, h.head) for h in circuit.extraction_heads[: cfg.max_heads]]
            if heads:  # none with max_heads 0
                why.append("heads: located extraction heads")
        elif cfg.method == "heads" and cfg.head_fallback == "attention" and circuit.subject_attention is not None:
            # no head extracts the attribute on its own: the heads that carry the subject to
            # the last position where blocking that flow hurts the prediction
            ko = circuit.knockout.subject  # (L,)
            att = circuit.subject_attention  # (L, H)
            score = {(la, h): att[la][h] * max(0.0, -ko[la]) / 100.0
                     for la in range(n_layers) for h in range(len(att[la]))}
            heads = [lh for lh in sorted(score, key=lambda lh: -score[lh]) if score[lh] > 0][: cfg.max_heads]
            if heads:
                why.append("heads: none extracts alone; the heads reading the subject where subject knockout hurts")
    plan = EditPlan(mlp, heads, "; ".join(why), position, mech)
    if position == MlpPosition.LAST:
        plan.read_layers = [la for la in read_window if la <= mlp]
    return plan


def _relation_plan(circuit: RecallCircuit, mech: str, n_layers: int) -> EditPlan:
    """``scope: relation``: the last position's MLP at the first layer of the window where
    blocking the subject's edges into the last position hurts most: the first MLP after the
    attention that reads the subject, so that its key holds the subject and the prompt
    together. Any layer may be chosen (``mlp_layers`` lists subject-site candidates)."""
    read_window = window_layers(circuit.knockout.strongest("subject"), circuit.knockout.window, n_layers)
    mlp = read_window[0]
    plan = EditPlan(mlp, [], f"scope relation: last-position MLP L{mlp}, the first after the subject is read "
                             f"(subject knockout window L{read_window[0]}-L{read_window[-1]}); {mech} mechanism",
                    MlpPosition.LAST, mech)
    plan.read_layers = [la for la in read_window if la <= mlp]
    return plan


@torch.no_grad()
def attended_offsets(adapter: ModelLayout, tok, request: EditRequest, heads: list[tuple[int, int]]) -> list[int]:
    """For each (layer, query head): the subject token it attends to most from the last position
    of the edit prompt, as an offset (<= 0) from the subject's last token (one clean pass, eager
    attention; with no attention weights to read, the last subject token: 0). The prompt's first
    token is never chosen: heads park attention there (the attention sink), and its state is
    its token alone, so a key there would fire on every prompt that starts with that token."""
    tp = tokenize_with_subject(tok, request.filled_prompt, request.subject)
    pattern = clean_run(adapter, tp.input_ids).attn_pattern  # (L, H, T) at the last position
    s0, s1 = tp.subject_span
    first = max(s0, 1) if s1 - 1 >= 1 else s1 - 1  # a one-token subject at position 0 keeps its token
    if pattern is None:
        return [0 for _ in heads]
    return [first + int(pattern[la, h, first:s1].argmax()) - (s1 - 1) for la, h in heads]
