"""Edit hyperparameters: the ``edit:`` section of a recipe (validated like every recipe)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factedit.editing.settings import (
    ALL,
    GENERAL,
    GROUPS,
    LOCATED,
    POSITIVE,
    Rule,
    at_least,
    between,
    check_config,
    read_section,
    setting,
    specs,
    type_text,
    unused_for,
    value_text,
)
from factedit.recipes import Choice, RecipeError, load_yaml, suggestion, warn


class Method(Choice):
    CIRCUIT = "circuit"  # the located MLP and heads
    MLP = "mlp"  # ROME/MEMIT-style
    HEADS = "heads"
    LORA = "lora"  # the fine-tuning baseline
    FT = "ft"  # constrained fine-tuning of one MLP (FT-L), the other baseline


class MlpSite(Choice):
    ENRICHMENT = "enrichment"
    TRACE = "trace"


class HeadFallback(Choice):
    ATTENTION = "attention"
    NONE = "none"


class SequentialStrategy(Choice):
    KEPT = "kept"
    REFIT = "refit"
    NULLSPACE = "nullspace"


class BatchStrategy(Choice):
    SPREAD = "spread"
    REFIT = "refit"


class InsertKeys(Choice):
    MEAN = "mean"
    CONTEXTS = "contexts"


class HeadPosition(Choice):
    """Where a head's value update is keyed: the subject's last token, or the subject token the
    head attends to most from the last position (in the edit prompt)."""
    LAST_SUBJECT = "last_subject"
    ATTENDED = "attended"


class MlpPosition(Choice):
    """Where an MLP update is keyed: the subject's last token (ROME's site) or the last position
    (a lookup MLP)."""
    SUBJECT = "subject"
    LAST = "last"


class Scope(Choice):
    """Where a circuit edit takes effect, by the components it updates: ``both`` the subject's
    MLP and the extraction heads (which read the subject from the last position); ``subject``
    the subject's MLP only (the subject's representation: every prompt about it); ``relation``
    the last position's MLP just after the subject is read (keyed on subject and prompt
    together: this relation's prompts)."""
    BOTH = "both"
    SUBJECT = "subject"
    RELATION = "relation"


METHODS = Method.values()
# the EditConfig fields with a fixed set of values, and their types
CHOICES: dict[str, type[Choice]] = {"method": Method, "mlp_site": MlpSite, "head_fallback": HeadFallback,
                                    "scope": Scope, "sequential_strategy": SequentialStrategy,
                                    "batch_strategy": BatchStrategy, "insert_keys": InsertKeys,
                                    "lookup_position": MlpPosition, "batch_insert_keys": InsertKeys,
                                    "head_position": HeadPosition}

FIT = LOCATED + ("lora",)  # the value fit's memory limit and the context prefixes serve LoRA too
RANDOM = LOCATED + ("lora",)  # FT-L trains on the bare prompts: nothing in it is random
LAYER = "layer index"


@dataclass
class EditConfig:
    """The edit hyperparameters: a recipe's ``edit:`` section. Each field's group, unit, valid
    values, methods and help are in its metadata (:mod:`factedit.editing.settings`); in a
    recipe the settings are written by group, in Python they are plain attributes."""

    # general: written directly under edit:
    method: Method = setting(Method.CIRCUIT, group=GENERAL, help="what an edit updates: circuit (the located MLP "
                             "and heads), mlp (ROME/MEMIT-style, the MLP only), heads (heads only); lora and ft "
                             "are the baselines")
    seed: int = setting(0, group=GENERAL, valid=at_least(0), methods=RANDOM,
                        help="seed of the context prefixes, the batch's held prompts and the LoRA initialisation")

    scope: Scope = setting(Scope.BOTH, group="site", methods=("circuit",),
                           help="which located components an edit updates: both (the subject's MLP and the "
                                "extraction heads), subject (the subject's MLP only), relation (the last position's "
                                "MLP just after the subject is read)")
    # site. mlp_layers: the located enrichment MLP is used when it lies among them, else the
    # candidate layer nearest to it (or the first, when none was located)
    mlp_layers: list[int] | None = setting(
        None, group="site", unit=LAYER, valid=at_least(0, each=True), methods=ALL,
        help="candidate layers of the MLP update (lora, ft: the layers trained); null: every layer")
    # "enrichment": the largest drop when its updates at the subject are removed; "trace": ROME's
    # evidence, the largest causal-tracing indirect effect of the MLP at the last subject token
    mlp_site: MlpSite = setting(MlpSite.ENRICHMENT, group="site", methods=("circuit", "mlp"), experimental=True,
                                help="how the MLP layer is chosen among site.mlp_layers: the located enrichment "
                                     "MLP, or the peak of a causal trace")
    extraction_threshold: float = setting(
        20.0, group="site", unit="% drop", valid=between(0, 100), methods=("circuit",),
        help="a subject knockout in the upper half of the layers that lowers the prediction by at least this "
             "reads the fact as extraction, else as lookup")
    # a fact read as a "lookup" (the subject read low down, or no strong upper-layer subject
    # edge): "subject" (the last subject token's MLP, as for an extraction fact) | "last" (the
    # last-position MLP just after the read, keyed on subject and template together). Measured:
    # on the demo model "last" is the only site that works (its subject-site edits score ES 2);
    # on SmolLM2-135M a last-position edit moves the edit prompt and no paraphrase (PS 12.4 on 8
    # lookup facts, 91.7 at the subject; docs/results/real-edits.md), so the real
    # models' recipes ask for "subject". The default stays "last": the shipped demo checkpoint
    # carries its recipe without this field
    lookup_position: MlpPosition = setting(MlpPosition.LAST, group="site", methods=("circuit",),
                                           help="where a lookup fact is edited: the last subject token's MLP, "
                                                "or the last position's MLP just after the subject is read")
    max_heads: int = setting(2, group="site", unit="heads", valid=at_least(0), methods=("circuit", "heads"),
                             help="located extraction heads that get a value update (0: none)")
    head_fallback: HeadFallback = setting(HeadFallback.ATTENTION, group="site", methods=("heads",),
                                          experimental=True,
                                          help="no located extraction head: edit the heads carrying the subject "
                                               "where its knockout hurts (attention), or none")
    # a located head may put most of its subject attention on an earlier token than the last
    head_position: HeadPosition = setting(HeadPosition.LAST_SUBJECT, group="site", methods=("circuit", "heads"),
                                          experimental=True,
                                          help="where a head's value is written: the subject's last token, or "
                                               "the subject token the head attends to most")

    # keys: the subject's last token, after random context prefixes
    n_prefixes: int = setting(10, group="keys", unit="prefixes", valid=at_least(0), methods=FIT,
                              help="random context prefixes the prompt is also read after (0: the bare prompt only)")
    prefix_tokens: list[int] = setting(
        factory=lambda: [5, 10], group="keys", unit="tokens", methods=FIT,
        valid=Rule("a non-empty list, each at least 1", lambda v: bool(v) and min(v) >= 1),
        help="the prefixes' lengths, used in turn")

    # fit: ROME's v*
    steps: int = setting(25, group="fit", unit="Adam steps", valid=at_least(0), methods=LOCATED,
                         help="Adam steps of the value fit (0: score the unfitted values only)")
    lr: float = setting(0.5, group="fit", unit="learning rate", valid=POSITIVE, methods=LOCATED,
                        help="Adam's learning rate in the value fit")
    kl_weight: float = setting(0.0625, group="fit", unit="weight", valid=at_least(0), methods=LOCATED,
                               help="weight of the KL term that keeps fit.kl_prompt's prediction for the subject")
    kl_prompt: str = setting("{} is a", group="fit", methods=LOCATED,
                             valid=Rule("a text holding {} for the subject", lambda t: "{}" in t),
                             help="the prompt whose next-token distribution the KL term keeps")
    weight_decay: float = setting(0.5, group="fit", unit="weight", valid=at_least(0), methods=LOCATED,
                                  help="weight of the penalty on the size of the value change")
    clamp: float = setting(4.0, group="fit", unit="x the current value's norm", valid=POSITIVE, methods=LOCATED,
                           help="the value change's norm is at most this times the current value's")
    stop_nll: float = setting(0.05, group="fit", unit="nats", valid=at_least(0), methods=LOCATED,
                              help="the fit stops early once the mean target NLL is below this")
    # estimated; 64 SmolLM2 requests at once took 22 GiB
    fit_memory_gib: float = setting(4.0, group="fit", key="memory_gib", unit="GiB", valid=POSITIVE, methods=FIT,
                                    help="memory the fit's autograd may take per chunk of requests (a batch is cut "
                                         "into chunks below it); the LoRA baseline's too")

    # insert. insert_keys "mean" (ROME: the key averaged over the contexts; context i then gets
    # the share r_i = k*^T C^-1 k_i / k*^T C^-1 k* of the change, the bare prompt included) |
    # "contexts" (the C-smallest rank-one update that gives every prompt the value was fitted
    # on all of it). Measured on SmolLM2-135M (20 single ROME-setting edits at L3, the same
    # fitted values): ES 85 -> 100, PS up, NS kept (docs/results/real-edits.md)
    insert_keys: InsertKeys = setting(InsertKeys.CONTEXTS, group="insert", key="keys", methods=LOCATED,
                                      help="which keys a single or sequential edit maps to the value: their mean "
                                           "over the contexts (ROME), or each context's own")
    ridge: float = setting(1e-4, group="insert", unit="x mean diagonal of C", valid=at_least(0), methods=LOCATED,
                           help="added to C before solving")
    subject_conditional: bool = setting(True, group="insert", methods=("circuit",),
                                        help="a last-position (lookup) edit must not fire with the subject hidden "
                                             "from that position (single and kept sequential edits)")

    # stats
    stats_samples: int = setting(20000, group="stats", key="samples", unit="token positions", valid=at_least(1),
                                 methods=FIT, help="token positions C is summed over (also the text sampled from "
                                                   "a model without a corpus, the prefixes' source)")
    stats_max_length: int = setting(128, group="stats", key="max_length", unit="tokens", valid=at_least(1),
                                    methods=LOCATED, help="length of the text windows C is read in (at most the "
                                                          "model's context)")

    # batch
    batch_layers: list[int] | None = setting(None, group="batch", key="layers", unit=LAYER,
                                             valid=at_least(0, each=True), methods=LOCATED,
                                             help="MLP layers a batch spreads over (MEMIT); null: batch.span layers")
    batch_span: int = setting(1, group="batch", key="span", unit="layers", valid=at_least(1), methods=LOCATED,
                              help="with batch.layers null: this many layers ending at the most common planned one")
    batch_lambda: float = setting(15000.0, group="batch", key="lambda", unit="weight of C", valid=POSITIVE,
                                  methods=LOCATED, help="MEMIT's weight of C against the new keys (larger: other "
                                                        "keys move less)")
    batch_passes: int = setting(1, group="batch", key="passes", unit="sweeps", valid=at_least(1), methods=LOCATED,
                                help="sweeps over the batch layers (MEMIT: 1); more close the residual further")
    batch_strategy: BatchStrategy = setting(BatchStrategy.SPREAD, group="batch", key="strategy", methods=LOCATED,
                                            help="spread (MEMIT: one residual fitted at the top layer, spread over "
                                                 "the layers) or refit (each layer fits and inserts what is left)")
    # "contexts": each context's own residual with weight 1 / (n_prefixes + 1), so that a
    # request weighs as much against λC as MEMIT's mean key
    batch_insert_keys: InsertKeys = setting(InsertKeys.MEAN, group="batch", key="insert_keys", methods=LOCATED,
                                            help="a batch's keys: one per request, the mean over the contexts "
                                                 "(MEMIT), or each context's own")
    # factedit's, not MEMIT's: the request's prompt asked about another subject of the batch
    # joins the solve with a zero residual (see requests.held_requests)
    held_prompts: int = setting(0, group="batch", unit="prompts per request", valid=at_least(0), methods=LOCATED,
                                help="prompts about other subjects of the batch held where they are (0: none)")

    # sequence (factedit/editing/sequential.py)
    sequential_strategy: SequentialStrategy = setting(
        SequentialStrategy.KEPT, group="sequence", key="strategy", methods=LOCATED,
        help="kept (the circuit's site, rank-one against C + K Kᵀ/λ), refit (the sequence's layers each fit "
             "what is missing) or nullspace (refit confined to C's null space, AlphaEdit)")
    sequential_lambda: float = setting(300.0, group="sequence", key="lambda", unit="weight", valid=at_least(0),
                                       methods=LOCATED, help="kept: earlier edits' keys join C as K Kᵀ/λ (0: off); "
                                                             "refit, nullspace: the λ of λC")
    sequential_layers: list[int] | None = setting(None, group="sequence", key="layers", unit=LAYER,
                                                  valid=at_least(0, each=True), methods=LOCATED,
                                                  help="refit, nullspace: the layers swept; null: batch.layers, "
                                                       "else every layer")
    sequential_passes: int = setting(1, group="sequence", key="passes", unit="sweeps", valid=at_least(1),
                                     methods=LOCATED, help="refit, nullspace: sweeps over the layers per edit")
    sequential_keep: float = setting(1.0, group="sequence", key="keep", unit="weight", valid=at_least(0),
                                     methods=LOCATED, help="refit, nullspace: weight of each kept key (earlier "
                                                           "edits, held prompts)")
    # so that an edit the protective first pass did not take is written by a looser pass
    sequential_lambda_decay: float = setting(1.0, group="sequence", key="lambda_decay", unit="factor per pass",
                                             valid=POSITIVE, methods=LOCATED,
                                             help="refit: pass p solves with λ / decay^p (1: every pass at "
                                                  "sequence.lambda)")
    # that update belongs to the step of the edit at which the check ran
    sequential_reassert_every: int = setting(0, group="sequence", key="reassert_every", unit="edits",
                                             valid=at_least(0), methods=LOCATED,
                                             help="refit, nullspace: every this many edits, earlier edits whose "
                                                  "target NLL rose above reassert_nll are swept again (0: never)")
    sequential_reassert_nll: float = setting(0.7, group="sequence", key="reassert_nll", unit="nats",
                                             valid=at_least(0), methods=LOCATED,
                                             help="the target NLL above which an earlier edit counts as overwritten "
                                                  "(0.7: p < 0.5)")
    # a cost that grows with the sequence when 0 (see sequential.checked)
    sequential_reassert_window: int = setting(0, group="sequence", key="reassert_window", unit="edits",
                                              valid=at_least(0), methods=LOCATED,
                                              help="earlier edits each check reads, in rotation (0: all of them)")
    nullspace_threshold: float = setting(1e-3, group="sequence", unit="x largest eigenvalue of C",
                                         valid=between(0, 1, open_ends=True), methods=LOCATED,
                                         help="nullspace: C's eigenvalues below this span the null space")

    # the baselines
    lora_rank: int = setting(4, group="lora", key="rank", unit="rank", valid=at_least(1), methods=("lora",),
                             help="rank of the LoRA factors on each MLP output projection")
    lora_steps: int = setting(40, group="lora", key="steps", unit="Adam steps", valid=at_least(1),
                              methods=("lora",), help="Adam steps of the fine-tuning")
    lora_lr: float = setting(5e-3, group="lora", key="lr", unit="learning rate", valid=POSITIVE, methods=("lora",),
                             help="Adam's learning rate")
    # ROME's FT-L: 25 steps at 5e-4, constraint 5e-4 (factedit/editing/ft_l.py)
    ft_steps: int = setting(25, group="ft", key="steps", unit="Adam steps", valid=at_least(1), methods=("ft",),
                            help="Adam steps on the MLP output weights of site.mlp_layers")
    ft_lr: float = setting(5e-4, group="ft", key="lr", unit="learning rate", valid=POSITIVE, methods=("ft",),
                           help="Adam's learning rate")
    ft_norm_constraint: float = setting(5e-4, group="ft", key="norm_constraint", unit="weight units",
                                        valid=POSITIVE, methods=("ft",),
                                        help="each weight's change is clipped to ± this")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_recipe(cls, data: Any, where: str = "edit", method: str | None = None) -> EditConfig:
        """An ``edit:`` section read from ``where`` (``"<file>: edit"``), grouped or flat
        (:func:`factedit.editing.settings.read_section`); ``method`` (the command line's)
        replaces the section's, and the settings are checked against it."""
        kwargs = read_section(cls, data, where, method)
        if method is not None:
            kwargs["method"] = Method.parse(method, f"{where}: --method")
        return cls(**kwargs)

    def _parse_choices(self) -> None:
        """The choice fields as their enums (a plain string given in code is accepted); an unknown
        value is an error naming the field and the allowed values."""
        for name, kind in CHOICES.items():
            setattr(self, name, kind.parse(getattr(self, name), f"edit.{name}"))

    def validate(self) -> None:
        """Every setting within its valid values (run on construction, and again before an edit:
        a field may have been set after construction)."""
        self._parse_choices()
        check_config(self)

    def check_layers(self, n_layers: int) -> None:
        for s in specs(type(self)):
            if s.setting.unit != LAYER:
                continue
            for la in getattr(self, s.name) or []:
                if not 0 <= la < n_layers:
                    raise RecipeError(f"edit.{s.path} holds layer {la}, but the model has layers 0..{n_layers - 1}")


def load_edit_config(path: str | Path, method: str | None = None) -> EditConfig:
    """The ``edit:`` section of the recipe file ``path``; with ``method`` (the command line's
    ``--method``) its settings are checked against that method instead of the recipe's."""
    return EditConfig.from_recipe(load_yaml(path).get("edit", {}), f"{path}: edit", method)


def with_method(cfg: EditConfig, method: str) -> EditConfig:
    """``cfg`` with another ``method``, warning which of its settings (changed from their
    defaults, e.g. by the model's own recipe) do nothing for that method."""
    idle = unused_for(cfg, method)
    if idle and str(method) != str(cfg.method):
        shown_keys = ", ".join(idle[:8]) + (f" and {len(idle) - 8} more" if len(idle) > 8 else "")
        warn(f"method {method}: the recipe's {shown_keys} do nothing for it and are left unused")
    return dataclasses.replace(cfg, method=method)


# `factedit edit` options that act through one stage of an edit, and the methods they act in:
# the baselines take no located circuit, fit no value and make no sequence; FT-L reads no corpus
# and draws nothing at random
EDIT_OPTIONS: dict[str, tuple[str, ...]] = {
    "--circuit": LOCATED, "--fit-cache": LOCATED, "--mode sequential": LOCATED, "--append": LOCATED,
    "--stats-corpus": FIT, "--seed": RANDOM, "--scope": ("circuit",),
}


def check_options(method: str, given: list[str]) -> None:
    """Refuse command-line options (``given``, keys of :data:`EDIT_OPTIONS`) that do nothing for ``method``."""
    idle = [o for o in given if str(method) not in EDIT_OPTIONS[o]]
    if idle:
        each = "; ".join(f"{o} (acts in {', '.join(EDIT_OPTIONS[o])})" for o in idle)
        raise RecipeError(f"option(s) that do nothing for method {method}: {each}; leave them out or choose a "
                          "method they act in")


def explain_rows(config: EditConfig | None = None, group: str | None = None) -> list[dict[str, str]]:
    """Every edit setting (of ``group``, or all) as text: group, key, attribute, type, unit,
    valid, default, methods, experimental, help; with ``config``, its value too."""
    if group is not None and group not in GROUPS:
        raise RecipeError(f"unknown settings group {group!r}{suggestion(group, GROUPS)}; the groups are "
                          f"{', '.join(GROUPS)}")
    out = []
    for s in specs(EditConfig):
        if group is not None and s.group != group:
            continue
        row = {"group": s.group, "key": s.path, "attribute": s.name, "type": type_text(s.hint), "unit": s.setting.unit,
               "valid": s.setting.valid.text if s.setting.valid else "", "default": value_text(s.default),
               "methods": ", ".join(s.setting.methods) if s.setting.methods != ALL else "all",
               "experimental": "yes" if s.setting.experimental else "", "help": s.setting.help}
        if config is not None:
            row["value"] = value_text(getattr(config, s.name))
        out.append(row)
    return out


def explain(config: EditConfig | None = None, group: str | None = None, source: str = "recipe") -> str:
    """:func:`explain_rows` as text, group by group: what ``factedit recipe explain`` prints
    (``source`` names where ``config`` came from)."""
    lines: list[str] = []
    last = None
    for r in explain_rows(config, group):
        if r["group"] != last:
            last = r["group"]
            lines += ([""] if lines else []) + [f"{last}: {GROUPS[last]}"]
        kind = ", ".join(x for x in (r["type"], r["unit"], r["valid"]) if x)
        facts = [f"default {r['default']}"]
        if "value" in r:
            facts.append(f"{source}: the default" if r["value"] == r["default"] else f"{source} {r['value']}")
        facts += [f"methods: {r['methods']}"] + (["EXPERIMENTAL"] if r["experimental"] else [])
        facts += [f"Python: {r['attribute']}"] if r["attribute"] != r["key"] else []
        lines += [f"  {r['key']} ({kind})", f"      {r['help']}", f"      {'; '.join(facts)}"]
    return "\n".join(lines)
