"""Edit hyperparameters: the ``edit:`` section of a recipe (validated like every recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from factedit.recipes import Choice, RecipeError, from_dict, load_yaml


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


METHODS = Method.values()
# the EditConfig fields with a fixed set of values, and their types
CHOICES: dict[str, type[Choice]] = {"method": Method, "mlp_site": MlpSite, "head_fallback": HeadFallback,
                                    "sequential_strategy": SequentialStrategy, "batch_strategy": BatchStrategy,
                                    "insert_keys": InsertKeys, "lookup_position": MlpPosition,
                                    "batch_insert_keys": InsertKeys, "head_position": HeadPosition}


@dataclass
class EditConfig:
    method: Method = Method.CIRCUIT  # circuit (MLPs + heads) | mlp (ROME/MEMIT-style) | heads | lora, ft (baselines)
    # where: candidate layers for the MLP update; the located enrichment MLP is used when it lies
    # among them, else the candidate layer nearest to it (or the first, when none was located)
    mlp_layers: list[int] | None = None  # None: every layer is a candidate
    # how the MLP layer is chosen among mlp_layers: "enrichment" (the located enrichment MLP:
    # the largest drop when its updates at the subject are removed) | "trace" (ROME's evidence:
    # the largest causal-tracing indirect effect of the MLP at the last subject token)
    mlp_site: MlpSite = MlpSite.ENRICHMENT
    batch_layers: list[int] | None = None  # MLP layers a batch edit spreads over (MEMIT); None: around the best
    batch_span: int = 1  # when batch_layers is None: this many layers ending at the most common located layer
    extraction_threshold: float = 20.0  # % drop from upper-half subject knockout that means "extraction"
    subject_conditional: bool = True  # lookup edits: the update must not fire with the subject hidden
    # where the circuit method edits a fact it reads as a "lookup" (the subject read low down,
    # or no strong upper-layer subject edge): "subject" (the last subject token's MLP, as for an
    # extraction fact) | "last" (the last-position MLP just after the read, keyed on subject and
    # template together). Measured: on the demo model "last" is the only site that works (its
    # subject-site edits score ES 2); on SmolLM2-135M a last-position edit moves the edit prompt
    # and no paraphrase (PS 12.4 on 8 lookup facts, 91.7 at the subject; README, "Edit quality on
    # real models"), so the real models' recipes ask for "subject". The default stays "last":
    # the shipped demo checkpoint carries its recipe without this field
    lookup_position: MlpPosition = MlpPosition.LAST
    max_heads: int = 2  # extraction heads that get a value update
    # no located extraction head: "attention" (the heads reading the subject) | "none"
    head_fallback: HeadFallback = HeadFallback.ATTENTION
    # where a head's value is written: "last_subject" (the subject's last token, as ROME keys an
    # MLP) | "attended" (the subject token the head attends to most from the last position: a
    # located head may put most of its subject attention on an earlier token)
    head_position: HeadPosition = HeadPosition.LAST_SUBJECT
    # keys: the subject's last token, after random context prefixes
    n_prefixes: int = 10
    prefix_tokens: list[int] = field(default_factory=lambda: [5, 10])
    # which keys the rank-one update (single and sequential edits) must map to the fitted value:
    # "mean" (ROME: the key averaged over the contexts; context i then gets the share
    # r_i = k*^T C^-1 k_i / k*^T C^-1 k* of the change, the bare prompt included) | "contexts"
    # (each context's own key, the bare prompt's among them: the C-smallest rank-one update that
    # gives every prompt the value was fitted on all of it). Measured on SmolLM2-135M (20 single
    # ROME-setting edits at L3, the same fitted values): ES 85 -> 100, PS up, NS kept (README,
    # "Edit quality on real models"); the bare prompt's key is the one ROME's mean serves least
    insert_keys: InsertKeys = InsertKeys.CONTEXTS
    # the same choice for a batch's least squares: "mean" (MEMIT: one key per request, the mean
    # over the contexts) | "contexts" (each context's own key and its own residual, with weight
    # 1 / (n_prefixes + 1), so that a request weighs as much against λC as MEMIT's mean key)
    batch_insert_keys: InsertKeys = InsertKeys.MEAN
    # the new value (ROME's v*): Adam on the target's log-likelihood with a KL term
    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    kl_prompt: str = "{} is a"
    weight_decay: float = 0.5
    clamp: float = 4.0  # ||delta|| <= clamp * ||current value||
    stop_nll: float = 0.05  # stop early once the mean target NLL is below this
    # memory the value fit's autograd may take per batch of requests (estimated; a batch is
    # cut into smaller ones to stay below it: 64 SmolLM2 requests at once took 22 GiB)
    fit_memory_gib: float = 4.0
    # statistics of keys
    stats_samples: int = 20000  # token positions
    stats_max_length: int = 128
    ridge: float = 1e-4  # added to C (relative to its mean diagonal) before solving
    batch_lambda: float = 15000.0  # MEMIT's weight of C against the new keys
    # sequential edits: earlier edits' keys join C with this weight (C + K K^T / λ), so that
    # later edits move them little; 0 turns it off (each edit then sees C alone, as ROME)
    sequential_lambda: float = 300.0
    # how a sequence writes each edit (factedit/editing/sequential.py): "kept" (the circuit's
    # site, rank-one against C + K K^T / λ) | "refit" (every layer of sequential_layers in turn
    # fits what is still missing and inserts it by least squares against λC + w·(kept keys)) |
    # "nullspace" (the same sweep, the update confined to the null space of C, AlphaEdit)
    sequential_strategy: SequentialStrategy = SequentialStrategy.KEPT
    sequential_layers: list[int] | None = None  # refit/nullspace: the layers swept; None: batch_layers, else all
    sequential_passes: int = 1  # refit/nullspace: sweeps over the layers per edit
    sequential_keep: float = 1.0  # refit/nullspace: weight w of each kept key (earlier edits, held prompts)
    # refit: pass p (0, 1, ...) solves with λ / decay**p, so that an edit the protective first
    # pass did not take is written by a looser pass (1: every pass uses sequential_lambda)
    sequential_lambda_decay: float = 1.0
    # refit/nullspace: every this many edits (0: never), each earlier edit of the sequence whose
    # target NLL has risen above sequential_reassert_nll (later edits overwrote it) is swept
    # again; that update belongs to the step of the edit at which the check ran
    sequential_reassert_every: int = 0
    sequential_reassert_nll: float = 0.7  # ~ p(target) < 0.5
    # the check reads this many earlier edits, in rotation (0: all of them, a cost that grows
    # with the sequence; see sequential.checked)
    sequential_reassert_window: int = 0
    nullspace_threshold: float = 1e-3  # nullspace: eigenvalues of C below this times the largest span the null space
    batch_passes: int = 1  # sweeps over the batch layers (MEMIT: 1); more close the residual further
    # how a batch is shared among its layers: "spread" (MEMIT: one residual fitted at the top
    # layer, spread over the layers) | "refit" (each layer in turn fits and inserts what is left)
    batch_strategy: BatchStrategy = BatchStrategy.SPREAD
    # batch: held prompts per request (factedit's, not MEMIT's; 0 turns them off): the request's prompt
    # asked about another subject of the batch joins the solve with a zero residual, so that
    # the update tells edited subjects from the rest (see requests.held_requests)
    held_prompts: int = 0
    # LoRA fine-tuning baseline
    lora_rank: int = 4
    lora_steps: int = 40
    lora_lr: float = 5e-3
    # method ft (FT-L, factedit/editing/ft_l.py): Adam on the MLP output weights at mlp_layers,
    # the change clipped elementwise to ±ft_norm_constraint (ROME's FT-L: 25 steps at 5e-4, 5e-4)
    ft_steps: int = 25
    ft_lr: float = 5e-4
    ft_norm_constraint: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        self._parse_choices()

    def _parse_choices(self) -> None:
        """The choice fields as their enums (a plain string given in code is accepted); an unknown
        value is an error naming the field and the allowed values."""
        for name, kind in CHOICES.items():
            setattr(self, name, kind.parse(getattr(self, name), f"edit.{name}"))

    def validate(self) -> None:
        self._parse_choices()  # again: a field may have been set after construction
        for name in ("steps", "n_prefixes", "stats_samples", "lora_rank", "lora_steps", "ft_steps", "batch_span",
                     "sequential_passes"):
            if getattr(self, name) < 0 or (name != "n_prefixes" and getattr(self, name) == 0):
                raise RecipeError(f"edit.{name} must be positive, got {getattr(self, name)}")
        if "{}" not in self.kl_prompt:
            raise RecipeError(f"edit.kl_prompt must contain '{{}}' for the subject, got {self.kl_prompt!r}")
        for name in ("clamp", "lr", "lora_lr", "ft_lr", "ft_norm_constraint", "batch_lambda", "batch_passes",
                     "stats_max_length",
                     "nullspace_threshold", "sequential_lambda_decay", "fit_memory_gib"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"edit.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_heads", "held_prompts", "kl_weight", "weight_decay", "ridge", "stop_nll",
                     "sequential_lambda", "sequential_keep", "sequential_reassert_every",
                     "sequential_reassert_nll", "sequential_reassert_window"):
            if getattr(self, name) < 0:
                raise RecipeError(f"edit.{name} must be zero or more, got {getattr(self, name)}")
        if not self.prefix_tokens or min(self.prefix_tokens) < 1:
            raise RecipeError(f"edit.prefix_tokens must be a non-empty list of positive token lengths, "
                              f"got {self.prefix_tokens}")

    def check_layers(self, n_layers: int) -> None:
        for name in ("mlp_layers", "batch_layers", "sequential_layers"):
            for la in getattr(self, name) or []:
                if not 0 <= la < n_layers:
                    raise RecipeError(f"edit.{name} holds layer {la}, but the model has layers 0..{n_layers - 1}")


def load_edit_config(path: str | Path) -> EditConfig:
    data = load_yaml(path)
    return from_dict(EditConfig, data.get("edit", {}), where=f"{path}: edit")
