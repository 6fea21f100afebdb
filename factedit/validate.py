"""The one validation layer: what every loader, the command line and the Python API check.

Each check names what was wrong and how to fix it, and raises :class:`FactEditError` (exit
code 2 at the command line), or returns the problem as a string for a caller that adds where
the value came from (a record of a file, an option).

- Text (prompts, subjects, targets, related text): a string, non-empty where required,
  Unicode that UTF-8 can hold (no lone surrogates, as a JSON ``\\ud800`` escape or a
  mis-decoded argument gives), at most :data:`MAX_TEXT_CHARS` characters. Checked before any
  model is loaded.
- Prompts and subjects (:func:`prompt_problem`, :func:`request_problem`): the same rules for a
  ``locate``/``trace``/``edit`` prompt given as options, a request file, an ``edits.json``, an
  audit dataset and the Python API: at most one ``{}``, a subject without ``{}`` that occurs in
  a full prompt; paraphrases name the subject, and a neighbourhood prompt is never the edited
  fact itself.
- Numbers (:func:`number`, :data:`BOUNDS`): finite and within a range; the command line's
  numeric options use the same bounds (``factedit.cli``).
- Integrity and cache locations live beside it, in :mod:`factedit.integrity`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError, shown

MAX_TEXT_CHARS = 100_000  # a prompt, subject, target or related text, in characters
MAX_PROMPTS = 10_000  # paraphrase or neighbourhood prompts of one request
MAX_RELATED_BYTES = 2**20  # --related-file

# (low, high) of every numeric option and API argument, inclusive
BOUNDS: dict[str, tuple[float, float]] = {
    "seed": (0, 2**32 - 1),
    "window": (1, 10_000),  # layers; checked against the model's layers once it is loaded
    "samples": (1, 10_000),
    "noise": (1e-12, 1e6),
    "limit": (1, 10**9),
    "paraphrases": (0, 1_000),
    "description_tokens": (1, 4_096),
    "facts": (1, 1_000_000),
    "undo": (1, 10**9),
    "processes": (1, 256),
}


def number(value: Any, label: str, low: float, high: float, *, integer: bool = True) -> int | float:
    """``value`` as a finite int (or float) within [low, high]; a one-line error naming
    ``label`` (e.g. "--samples", "samples") otherwise."""
    kind = "an integer" if integer else "a finite number"
    want = f"{label} must be {kind} of at least {_n(low)} and at most {_n(high)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise FactEditError(f"{want}, got {type(value).__name__} {shown(value)}")
    if not math.isfinite(value) or not low <= value <= high:
        raise FactEditError(f"{want}, got {_n(value)}")
    return value


def bounded(name: str, value: Any, label: str | None = None, *, integer: bool = True) -> int | float:
    low, high = BOUNDS[name]
    return number(value, label or name, low, high, integer=integer)


def _n(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


# ---- text ------------------------------------------------------------------------------------

def text_problem(value: Any, label: str, *, empty_ok: bool = False, limit: int = MAX_TEXT_CHARS) -> str | None:
    """What is wrong with a text field (``label``: how to name it), or None."""
    if not isinstance(value, str):
        return f"{label} must be a non-empty string, got {type(value).__name__} {shown(value)}"
    if not empty_ok and not value.strip():
        return f"{label} is empty ({shown(value)}): it must be a non-empty string"
    if len(value) > limit:
        return f"{label} is {len(value):,} characters long, more than factedit takes ({limit:,}): shorten it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"{label} is not valid text: it holds a lone surrogate ({value[exc.start]!r} at character "
                f"{exc.start}), which UTF-8 cannot hold: write it as UTF-8 text")
    return None


def check_text(value: Any, label: str, *, empty_ok: bool = False, limit: int = MAX_TEXT_CHARS) -> str:
    problem = text_problem(value, label, empty_ok=empty_ok, limit=limit)
    if problem is not None:
        raise FactEditError(problem)
    return value


def prompt_problem(prompt: Any, subject: Any, prompt_label: str = "field 'prompt'",
                   subject_label: str = "field 'subject'") -> str | None:
    """What is wrong with a (prompt, subject) pair: each a valid text; the subject without
    ``{}``; at most one ``{}`` in the prompt; a full prompt containing the subject."""
    for v, label in ((prompt, prompt_label), (subject, subject_label)):
        problem = text_problem(v, label)
        if problem is not None:
            return problem
    if "{}" in subject:
        return (f"{subject_label} contains '{{}}' ({shown(subject)}), which marks the subject's place in a "
                "template: a subject cannot contain it")
    if prompt.count("{}") > 1:
        return f"{prompt_label} has more than one '{{}}' ({shown(prompt)}): use exactly one, for the subject"
    if "{}" not in prompt and subject not in prompt:
        where = "" if prompt_label.startswith("the ") else f" ({prompt_label})"
        return (f"the subject {shown(subject)} does not occur in the prompt {shown(prompt)}{where}: check its "
                "spelling and case, or write the prompt as a template with '{}'")
    return None


def check_prompt(prompt: Any, subject: Any, target: Any = None, *, prompt_label: str = "the prompt",
                 subject_label: str = "the subject", target_label: str = "the target") -> None:
    """``locate``/``trace``'s prompt, subject and (optional) target, before any model work."""
    problem = prompt_problem(prompt, subject, prompt_label, subject_label)
    if problem is None and target is not None:
        problem = text_problem(target, target_label)
    if problem is not None:
        raise FactEditError(problem)


def request_problem(prompt: Any, subject: Any, target_new: Any, target_true: Any) -> str | None:
    """What is wrong with an edit request's fields, naming the field and the fix; None when valid."""
    for name, v in (("prompt", prompt), ("subject", subject), ("target_new", target_new)):
        problem = text_problem(v, f"field {name!r}")
        if problem is not None:
            return problem
    if target_true is not None:
        if not isinstance(target_true, str):
            return f"field 'target_true' must be a string, got {shown(target_true)}"
        problem = text_problem(target_true, "field 'target_true'")
        if problem is not None:
            return problem
    problem = prompt_problem(prompt, subject)
    if problem is not None:
        return problem
    if target_true is not None and target_true.strip() == target_new.strip():
        return f"fields 'target_new' and 'target_true' are equal ({shown(target_new)}): nothing to edit"
    return None


def prompts_problem(prompts: Any, field: str, subject: str | None = None, edited: Iterable[str] = ()) -> str | None:
    """What is wrong with a request's ``paraphrase_prompts`` or ``neighborhood_prompts``: a list
    of non-empty texts; paraphrases ask about the subject (it occurs in each); a neighbourhood
    prompt is never the edited fact itself (``edited``: the request's filled prompt and its
    paraphrases), which the edit must change and the neighbourhood must leave alone. (A
    neighbourhood prompt may ask about the edited subject's other relations: that the edit
    leaves those alone is what it measures.)"""
    if not isinstance(prompts, list) or not all(isinstance(x, str) and x.strip() for x in prompts):
        return f"field {field!r} must be a list of non-empty strings"
    if len(prompts) > MAX_PROMPTS:
        return f"field {field!r} holds {len(prompts):,} prompts, more than factedit takes ({MAX_PROMPTS:,})"
    for j, p in enumerate(prompts):
        problem = text_problem(p, f"field {field!r} prompt {j}")
        if problem is not None:
            return problem
    same = {" ".join(e.split()) for e in edited if isinstance(e, str)}
    for j, p in enumerate(prompts):
        if field == "neighborhood_prompts" and " ".join(p.split()) in same:
            return (f"field {field!r} prompt {j} ({shown(p)}) is the edited fact itself (the request's prompt or one "
                    "of its paraphrases), which the edit must change: a neighbourhood prompt asks what the edit must "
                    "leave alone; move it to 'paraphrase_prompts' or drop it")
        if field == "paraphrase_prompts" and subject and subject.casefold() not in p.casefold():
            return (f"field {field!r} prompt {j} ({shown(p)}) does not mention the subject {shown(subject)}: "
                    "a paraphrase asks about the edited subject; move it to 'neighborhood_prompts' or drop it")
    return None


def case_id_problem(case_id: Any) -> str | None:
    if case_id is not None and (isinstance(case_id, bool) or not isinstance(case_id, (str, int))):
        return f"field 'case_id' must be a string or an integer, got {shown(case_id)}"
    return None


# ---- the Python API's arguments --------------------------------------------------------------

def check_model_args(model: Any, tokenizer: Any, caller: str) -> None:
    """``model``: None (the demo model), a path or name, or a loaded model with its tokenizer."""
    if model is None or isinstance(model, (str, os.PathLike)):
        if isinstance(model, str):
            check_text(model, f"{caller}: model")
        return
    if not hasattr(model, "config") or not callable(model):
        raise FactEditError(f"{caller}: model must be None (the demo model), a model folder, a named model or a "
                            f"loaded causal LM, got {type(model).__name__}")
    if tokenizer is None:
        raise FactEditError(f"{caller}: pass the tokenizer together with a loaded model")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise FactEditError(f"{caller}: tokenizer must be the model's tokenizer, got {type(tokenizer).__name__}")


def check_instance(value: Any, types: type | tuple[type, ...], label: str, what: str, optional: bool = True) -> None:
    if (value is None and optional) or isinstance(value, types):
        return
    raise FactEditError(f"{label} must be {what}, got {type(value).__name__} {shown(value)}")


def check_path_arg(value: Any, label: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise FactEditError(f"{label} must be a path (a non-empty string or Path), got {shown(value)}")
    check_text(str(value), label)
    return Path(value)


def check_path_list(values: Any, label: str) -> list:
    if isinstance(values, (str, os.PathLike)) or not isinstance(values, Iterable):
        raise FactEditError(f"{label} must be a list of paths (or names), got {shown(values)}")
    values = list(values)
    for v in values:
        check_path_arg(v, label)
    return values


# ---- the form of JSON that factedit reads back -------------------------------------------------

def schema_problem(value: Any, spec: Any, path: str = "") -> str | None:
    """Where ``value`` (parsed JSON) departs from ``spec``, or None. A spec is "str", "int",
    "num" (a number, or null: non-finite numbers are written as null), "bool", "any";
    ``("?", spec)`` (that, or null); ``[spec]`` (a list of that); ``{"*": spec}`` (an object of
    that); ``{"key": spec, "opt?": spec}`` (an object with those keys; "?" marks one that may be
    missing; other keys are allowed)."""
    here = path or "the top level"
    if isinstance(spec, tuple) and spec[0] == "?":
        return None if value is None else schema_problem(value, spec[1], path)
    if isinstance(spec, str):
        ok = {"str": lambda v: isinstance(v, str),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "num": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
              "bool": lambda v: isinstance(v, bool),
              "any": lambda v: True}[spec](value)
        kind = {"str": "a string", "int": "an integer", "num": "a number", "bool": "true or false",
                "any": "anything"}[spec]
        return None if ok else f"{here} must be {kind}, got {shown(value)}"
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{here} must be a list, got {shown(value)}"
        for i, v in enumerate(value):
            problem = schema_problem(v, spec[0], f"{path}[{i}]")
            if problem is not None:
                return problem
        return None
    if not isinstance(value, dict):
        return f"{here} must be an object, got {shown(value)}"
    if "*" in spec:
        for k, v in value.items():
            problem = schema_problem(v, spec["*"], f"{path}.{k}" if path else str(k))
            if problem is not None:
                return problem
        return None
    for key, sub in spec.items():
        name = key.rstrip("?")
        if name not in value:
            if key.endswith("?"):
                continue
            return f"{here} lacks the field {name!r}"
        problem = schema_problem(value[name], sub, f"{path}.{name}" if path else name)
        if problem is not None:
            return problem
    return None


_CURVES = {"window": "int", "subject": ["num"], "non_subject": ["num"], "last": ["num"]}
_SUBLAYER = {"prob_change": ["num"], "extraction": ("?", ["num"]), "attribute_rate": ("?", ["num"])}
_TRACE = {"kind": "str", "window": "int", "noise": "num", "samples": "int", "seed": "int", "token": "int",
          "p_clean": "num", "p_corrupt": "num", "positions": ["int"], "effect": [["num"]]}
CIRCUIT_SCHEMA = {
    "prompt": "str", "subject": "str", "subject_span": ["int"], "tokens": ["str"], "prediction": "str",
    "prediction_id": "int", "prediction_prob": "num", "target": ("?", "str"), "target_id": "int", "target_prob": "num",
    "model": "str", "model_fingerprint": "str", "n_layers": "int", "n_heads": "int", "config": {"*": "any"},
    "knockout": _CURVES, "knockout_target": ("?", _CURVES), "attribute_rate": ("?", ["num"]),
    "attribute_rate_by_position": ("?", {"*": ["num"]}), "related_source": ("?", "str"),
    "projection": {"*": ["num"]}, "extraction_events": {"attn": ["int"], "mlp": ["int"]},
    "head_rank": ("?", [["int"]]), "head_prob": ("?", [["num"]]), "subject_attention": ("?", [["num"]]),
    "sublayer_knockout": {"window": "int", "read_layer": "int", "base_prob": "num", "base_attribute_rate": "num",
                          "base_extraction": "num", "mlp": _SUBLAYER, "attn": _SUBLAYER},
    "enrichment_metric": "str",
    "enrichment_mlps?": [{"layer": "int", "score": "num"}],
    "extraction_heads?": [{"layer": "int", "head": "int", "score": "num", "rank": "int", "ov_rank?": ("?", "int")}],
    "trace?": ("?", _TRACE),
}


def circuit_problem(data: dict) -> str | None:
    """What is wrong with a circuit.json's content (its form, and its sizes agreeing), or None."""
    problem = schema_problem(data, CIRCUIT_SCHEMA)
    if problem is not None:
        return problem
    n_layers, n_heads, tokens = data["n_layers"], data["n_heads"], data["tokens"]
    if not 1 <= n_layers <= 10_000 or not 1 <= n_heads <= 10_000:
        return f"n_layers {n_layers} and n_heads {n_heads} must lie between 1 and 10,000"
    span = data["subject_span"]
    if len(span) != 2 or not 0 <= span[0] < span[1] <= len(tokens):
        return f"subject_span {span} is not a token span [start, end) of the {len(tokens)} tokens"
    for name in ("knockout", "knockout_target"):
        c = data[name]
        if c is not None and not all(len(c[s]) == n_layers for s in ("subject", "non_subject", "last")):
            return f"{name} must hold one value per layer ({n_layers}) in each curve"
    return None


def fact_problem(prompt: Any, subject: Any, attribute: Any) -> str | None:
    """What is wrong with an audit fact, or None: the same rules as a request's fields."""
    return prompt_problem(prompt, subject, "its prompt", "field 'subject'") or text_problem(attribute,
                                                                                       "its attribute")


def template_problem(records: Any) -> str | None:
    """A dataset's raw records: a template (``template``, a ``prompt`` with '{}', CounterFact's
    ``requested_rewrite.prompt``) must hold at most one '{}' (the loader fills the first)."""
    if not isinstance(records, list):
        records = [records]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        rw = rec.get("requested_rewrite")
        for field, v in (("template", rec.get("template")), ("prompt", rec.get("prompt")),
                         ("requested_rewrite.prompt", rw.get("prompt") if isinstance(rw, dict) else None)):
            if isinstance(v, str) and v.count("{}") > 1:
                return (f"record {i}: field {field!r} has more than one '{{}}' ({shown(v)}): use exactly one, for the "
                        "subject")
    return None


def check_facts(facts: list, label: str, path: str | Path | None = None) -> list:
    """Audit facts (``AuditFact``) loaded from a dataset named ``label`` (e.g. "--dataset F";
    ``path``: its file, whose raw templates are checked too), checked as edit requests are: a
    one-line error naming the record or the fact."""
    if path is not None and Path(path).is_file():
        from factedit.io import read_text

        text = read_text(path, label)
        import json

        try:
            records = (json.loads(text) if not str(path).endswith(".jsonl")
                       else [json.loads(line) for line in text.splitlines() if line.strip()])
        except (ValueError, RecursionError):
            records = None  # the loader reported it already
        problem = template_problem(records)
        if problem is not None:
            raise FactEditError(f"{label}: {problem}")
    for f in facts:
        problem = fact_problem(f.prompt, f.subject, f.attribute)
        if problem is None and f.related is not None:
            problem = text_problem(f.related, "its 'related' text", empty_ok=True)
        if problem is not None:
            raise FactEditError(f"{label}: fact {f.index} (record id {shown(f.source_id)}): {problem}")
    return facts


WORLD_SCHEMA = {
    "seed?": "int", "meta?": {"*": "any"},
    "relations": {"*": {"templates": ["str"], "heldout_templates": ["str"], "attributes": ["str"]}},
    "entities": [{"name": "str", "facts": {"*": "str"}, "paraphrase_test?": "bool"}],
}


def world_problem(data: Any) -> str | None:
    """What is wrong with a world.json's content, or None: its form, and templates that fill
    (exactly one '{}' and no other brace: they are filled with ``str.format``)."""
    problem = schema_problem(data, WORLD_SCHEMA)
    if problem is not None:
        return problem
    for rid, rel in data["relations"].items():
        for t in rel["templates"] + rel["heldout_templates"]:
            if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
                return f"relation {shown(rid)} has the template {shown(t)}, which is not one '{{}}' for the subject"
    for i, e in enumerate(data["entities"]):
        if set(e["facts"]) != set(data["relations"]):
            return (f"entity {i} ({shown(e['name'])}) has facts of the relations {shown(sorted(e['facts']))}, not of "
                    f"each relation {shown(sorted(data['relations']))}")
    return None
