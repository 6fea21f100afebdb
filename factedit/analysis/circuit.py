"""`RecallCircuit`: one fact's recall circuit and every curve it was located from.

It round-trips through JSON (`to_json` / `from_json`); `circuit.json` files carry the model's
fingerprint so that an edit can refuse a circuit located on another model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factedit.analysis.knockout import SOURCE_SETS, KnockoutCurves
from factedit.analysis.sublayer import SublayerKnockoutResult
from factedit.analysis.trace import TraceResult
from factedit.errors import FactEditError
from factedit.io import atomic_write_text, dumps_json
from factedit.recipes import RecipeError

FORMAT = "factedit.recall_circuit/1"


class CircuitError(FactEditError):
    pass


@dataclass
class LocateConfig:
    """How a circuit is located. ``None`` means "scale with the model" (see ``resolved``)."""

    knockout_window: int | None = None  # k layers; the paper used 9 for GPT-2 XL's 48
    sublayer_window: int = 1  # layers whose MLP/MHSA updates are removed per row
    read_layer: int | None = None  # stream index for the attribute rate after sublayer knockout
    attribute_top_k: int = 50  # kept tokens in the attribute rate (the paper's 50)
    projection: str = "logit_lens"  # "logit_lens" (final norm + unembedding) or "raw" (the paper's)
    head_max_rank: int = 1  # a head is an extraction head when it ranks the token this high
    max_heads: int = 10
    max_enrichment: int = 3
    ov_check_heads: int = 5  # top extraction heads that get the OV parameter check
    # whether the non-subject knockout set includes a BOS token at position 0 (Gemma's
    # tokenizer adds one). Off: blocking the edge to the attention sink is not relation
    # information, and the paper's GPT models have no BOS
    knockout_bos: bool = False
    # causal tracing (ROME) of the MLP at the last subject token: off by default, it costs
    # trace_samples x (1 + L) forward passes; the edit turns it on where it chooses its MLP
    # layer by it (edit.mlp_site: trace)
    trace: bool = False
    trace_window: int = 10  # MLP layers restored per row (ROME's 10)
    trace_samples: int = 10  # noise samples (ROME's 10)
    trace_noise: float | None = None  # None: 3x the input embeddings' standard deviation

    def validate(self) -> None:
        from factedit.errors import shown
        from factedit.validate import BOUNDS

        if self.projection not in ("logit_lens", "raw"):
            raise RecipeError(f"analysis.projection must be 'logit_lens' or 'raw', not {shown(self.projection)}")
        for name in ("knockout_window", "read_layer", "sublayer_window", "attribute_top_k", "head_max_rank",
                     "max_heads", "max_enrichment", "ov_check_heads", "trace_window", "trace_samples"):
            v = getattr(self, name)
            low = 0 if name in ("read_layer", "ov_check_heads") else 1
            high = BOUNDS["samples"][1] if name == "trace_samples" else 100_000
            if v is None and name in ("knockout_window", "read_layer"):
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise RecipeError(f"analysis.{name} must be an integer, got {shown(v)}")
            if not low <= v <= high:
                raise RecipeError(f"analysis.{name} must be at least {low} (and at most {high:,}), got {v}")
        for name in ("knockout_bos", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"analysis.{name} must be true or false, got {shown(getattr(self, name))}")
        noise = self.trace_noise
        if noise is not None and (isinstance(noise, bool) or not isinstance(noise, (int, float))
                                  or not BOUNDS["noise"][0] <= noise <= BOUNDS["noise"][1]):
            raise RecipeError(f"analysis.trace_noise must be positive and finite, at most {BOUNDS['noise'][1]:g} (or "
                              f"null for 3x the embeddings' standard deviation), got {shown(noise)}")

    def resolved(self, n_layers: int) -> LocateConfig:
        """Fill the model-dependent defaults and check the windows against the model."""
        from factedit.analysis.sublayer import default_read_layer

        c = dataclasses.replace(self)
        if c.knockout_window is None:
            c.knockout_window = max(1, round(9 * n_layers / 48))
        if c.read_layer is None:
            c.read_layer = default_read_layer(n_layers)
        for name in ("knockout_window", "sublayer_window"):
            if getattr(c, name) > n_layers:
                raise FactEditError(
                    f"{name} {getattr(c, name)} is larger than the model's {n_layers} layers: "
                    f"use a window between 1 and {n_layers}"
                )
        if not 0 <= c.read_layer <= n_layers:
            raise FactEditError(f"read_layer {c.read_layer} must lie between 0 (embeddings) and {n_layers}")
        return c

    @property
    def final_norm(self) -> bool:
        return self.projection == "logit_lens"


@dataclass
class EnrichmentMLP:
    layer: int
    score: float  # drop caused by removing this MLP's updates at the subject positions


@dataclass
class ExtractionHead:
    layer: int
    head: int
    score: float  # probability of the token in the head's own projection at the last position
    rank: int  # its rank there (1 = top)
    ov_rank: int | None = None  # rank in the head's OV map applied to the subject (parameter check)


# The model's own prediction is followed unless a target is given; a prediction that is one of
# these (or punctuation), or less likely than LOW_TARGET_PROB, is flagged by
# RecallCircuit.target_warning. English function words: the tokens a prompt that does not end
# right before its attribute most often predicts.
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for from by with and or but as is are was were be been being it its this that "
    "these those he she they his her their which who what when where not no".split())
LOW_TARGET_PROB = 0.1


@dataclass
class RecallCircuit:
    prompt: str
    subject: str
    subject_span: list[int]  # [start, end) in tokens
    tokens: list[str]
    prediction: str  # the model's top-1 next token
    prediction_id: int
    prediction_prob: float
    target: str | None  # the token followed ("the attribute"): the given target, else the prediction
    target_id: int
    target_prob: float
    model: str
    model_fingerprint: str
    n_layers: int
    n_heads: int
    config: dict[str, Any]
    # attention knockout: relative change (%) of p(prediction) per centre layer
    knockout: KnockoutCurves
    knockout_target: KnockoutCurves | None  # the same for the given target, if any
    # attribute rate per stream layer (0 = embeddings), at the last subject token
    attribute_rate: list[float] | None
    attribute_rate_by_position: dict[str, list[float]] | None  # first_subject, last_subject, after_subject, last
    related_source: str | None  # where the related-token set came from
    # vocabulary projection at the last position, of the followed token
    projection: dict[str, list[float]]  # resid/attn/mlp _rank and _prob, per layer
    extraction_events: dict[str, list[int]]  # {"attn": layers, "mlp": layers} at rank 1
    head_rank: list[list[int]] | None  # (L, H); None when only extraction heads were ranked
    head_prob: list[list[float]] | None  # (L, H)
    subject_attention: list[list[float]] | None  # (L, H) attention of the last position on the subject
    sublayer_knockout: SublayerKnockoutResult  # of p(target_id)
    enrichment_metric: str
    enrichment_mlps: list[EnrichmentMLP] = field(default_factory=list)
    extraction_heads: list[ExtractionHead] = field(default_factory=list)
    # causal trace of the MLP at the last subject token (analysis.trace), None unless asked for
    trace: TraceResult | None = None
    format: str = FORMAT

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of circuit.json (the typed parts as their own ``to_dict``)."""
        d = dataclasses.asdict(self)
        d["knockout"] = self.knockout.to_dict()
        d["knockout_target"] = None if self.knockout_target is None else self.knockout_target.to_dict()
        d["sublayer_knockout"] = self.sublayer_knockout.to_dict()
        d["trace"] = None if self.trace is None else self.trace.to_dict()
        return d

    def to_json(self, indent: int | None = 1) -> str:
        """circuit.json: :meth:`to_dict` with the SHA-256 of its content (``sha256``), which
        :meth:`from_dict` checks: a circuit changed since it was written is refused."""
        from factedit.integrity import sha256_json

        d = self.to_dict()
        return dumps_json({**d, "sha256": sha256_json(json.loads(dumps_json(d)))}, indent=indent)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "circuit") -> RecallCircuit:
        from factedit.integrity import sha256_json
        from factedit.validate import circuit_problem

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CircuitError(f"{where} is not a factedit recall circuit (expected format {FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"enrichment_mlps", "extraction_heads", "trace", "format"})
        if missing:
            raise CircuitError(f"{where} lacks field(s) {', '.join(missing)}")
        problem = circuit_problem(data)
        if problem is not None:
            raise CircuitError(f"{where}: malformed circuit ({problem}): pass a circuit.json from `factedit locate` "
                               "(or locate the fact again)")
        if "sha256" in data and data["sha256"] != sha256_json({k: v for k, v in data.items() if k != "sha256"}):
            raise CircuitError(f"{where} was changed since factedit wrote it (its content does not match the SHA-256 "
                               "recorded in it): locate the fact again with `factedit locate`")
        kw = {k: v for k, v in data.items() if k in names}
        try:
            kw["enrichment_mlps"] = [EnrichmentMLP(**m) for m in data.get("enrichment_mlps", [])]
            kw["extraction_heads"] = [ExtractionHead(**h) for h in data.get("extraction_heads", [])]
        except TypeError as exc:
            raise CircuitError(f"{where}: malformed enrichment_mlps/extraction_heads entry: {exc}") from exc
        try:
            kw["knockout"] = KnockoutCurves.from_dict(data["knockout"])
            if data["knockout_target"] is not None:
                kw["knockout_target"] = KnockoutCurves.from_dict(data["knockout_target"])
            kw["sublayer_knockout"] = SublayerKnockoutResult.from_dict(data["sublayer_knockout"], data["target_id"])
            if data.get("trace") is not None:
                kw["trace"] = TraceResult.from_dict(data["trace"])
        except (KeyError, TypeError) as exc:
            raise CircuitError(f"{where}: malformed knockout/knockout_target/sublayer_knockout/trace entry: "
                               f"{exc!r}") from exc
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str, where: str = "circuit") -> RecallCircuit:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CircuitError(f"{where} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise CircuitError(f"{where} is nested too deeply to be read: pass a circuit.json from `factedit locate`") \
                from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | Path) -> RecallCircuit:
        from factedit.io import read_text

        return cls.from_json(read_text(path, "circuit file", error=CircuitError), where=str(path))

    def target_warning(self, min_prob: float = LOW_TARGET_PROB) -> str | None:
        """Why the followed token may not be the fact's attribute, or None: the model's own
        prediction was followed and it is a function word or punctuation (" the", ","), or its
        probability is below ``min_prob``. The circuit is then that of a token, not of a fact."""
        if self.target is not None:
            return None
        word = self.prediction.strip()
        why = []
        if word.lower() in FUNCTION_WORDS or not any(ch.isalnum() for ch in word):
            why.append("a function word or punctuation")
        if self.prediction_prob < min_prob:
            why.append(f"below p {min_prob:g}")
        if not why:
            return None
        return (f"the circuit follows the model's prediction {self.prediction!r} (p {self.prediction_prob:.2f}), "
                f"{' and '.join(why)}: it may not be the fact's attribute. Pass --target ATTRIBUTE (the Python "
                "API: target=...) to follow the attribute instead, or end the prompt where the attribute comes next")

    def summary(self) -> str:
        """A short human summary."""
        tok = (self.target or self.prediction).strip()
        s0, s1 = self.subject_span
        lines = [
            f"fact:        {self.prompt!r} -> {self.prediction.strip()!r} (p = {self.prediction_prob:.3f})"
            + (f"; following target {tok!r} (p = {self.target_prob:.3g})" if self.target else ""),
            f"subject:     tokens [{s0}, {s1}) = {self.tokens[s0:s1]}",
        ]
        k = self.knockout.window
        for src in SOURCE_SETS:
            c = self.knockout.curve(src)
            la = self.knockout.strongest(src)
            lines.append(f"knockout:    block {src:11s} -> last (window {k}): strongest at layer {la} "
                         f"({c[la]:+.1f}%), top window {c[-1]:+.1f}%")
        if self.attribute_rate is not None:
            ar = self.attribute_rate
            top = max(range(len(ar)), key=lambda i: ar[i])
            lines.append(f"enrichment:  attribute rate at the last subject token {ar[0]:.2f} (embeddings) -> "
                         f"{ar[top]:.2f} (layer {top}), related tokens from {self.related_source}")
        mlps = ", ".join(f"L{m.layer} ({m.score:.3g})" for m in self.enrichment_mlps) or "none"
        lines.append(f"enrichment MLPs: {mlps}  [{self.enrichment_metric}]")
        heads = ", ".join(
            f"L{h.layer}H{h.head} (p {h.score:.2f}, rank {h.rank}"
            + (f", OV rank {h.ov_rank}" if h.ov_rank is not None else "") + ")"
            for h in self.extraction_heads[:5]
        ) or "none at rank 1"
        lines.append(f"extraction heads: {heads}")
        if self.trace is not None:
            t = self.trace
            top = t.best_layer(t.positions[0])  # the last subject token, the one traced position
            lines.append(f"causal trace: MLP at the last subject token (window {t.window}) peaks at layer {top} "
                         f"(indirect effect {t.effect[top][0]:+.3f}; p {t.p_clean:.3f} clean, {t.p_corrupt:.3f} "
                         "subject corrupted)")
        ev = self.extraction_events
        lines.append(f"extraction events of {tok!r}: MHSA layers {ev['attn'] or 'none'}, "
                     f"MLP layers {ev['mlp'] or 'none'}")
        return "\n".join(lines)

    def check_model(self, fingerprint: str) -> None:
        """Refuse to use this circuit on a model other than the one it was located on."""
        if fingerprint != self.model_fingerprint:
            raise CircuitError(
                f"the circuit for {self.prompt!r} was located on another model ({self.model}, "
                f"fingerprint {self.model_fingerprint}); this model's fingerprint is {fingerprint}: "
                "run `factedit locate` on this model again"
            )


def load_locate_config(path: str | Path) -> LocateConfig:
    """The ``analysis:`` section of a recipe file (other sections are ignored here)."""
    from factedit.recipes import from_dict, load_yaml

    data = load_yaml(path)
    if "analysis" not in data:
        raise RecipeError(f"recipe {path} has no 'analysis:' section for locate")
    return from_dict(LocateConfig, data["analysis"], where=f"{path}: analysis")
