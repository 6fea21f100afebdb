"""The edit settings as data.

Each :class:`~factedit.editing.config.EditConfig` field carries a :class:`Setting` in its
metadata: the stage (group) it belongs to and its key there, its unit, the values it accepts,
the methods it acts in, whether it is experimental, and a one-line help. Everything else is
read from them: the reader of a recipe's ``edit:`` section (grouped, or the old flat keys
through one mapping, with a warning), the range checks, the refusal of settings the chosen
method does not use, ``factedit recipe explain`` and ``docs/configuration.md``.

In Python the settings stay flat attributes (``config.batch_lambda``); in a recipe they are
written by group (``edit: {batch: {lambda: 50.0}}``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from factedit.errors import shown
from factedit.recipes import Choice, RecipeError, check_type, unknown_keys, warn

ALL = ("circuit", "mlp", "heads", "lora", "ft")
LOCATED = ("circuit", "mlp", "heads")  # the methods that fit new values and write them at located sites
GENERAL = "general"  # the group whose keys are written directly under ``edit:``
SELECTOR = "method"  # the setting that decides which of the others act

GROUPS: dict[str, str] = {  # the stages, in the order an edit runs them
    GENERAL: "the method, and the seed of everything random; written directly under `edit:`",
    "site": "where an edit writes: which MLP layer and position, which attention heads",
    "keys": "the contexts keys and values are computed in: the prompt after random context prefixes",
    "fit": "the new value (ROME's v*): Adam on the target's log-likelihood, with a KL term and a norm limit",
    "insert": "how a fitted value is written into the weights: least squares against the key statistics C",
    "stats": "the key statistics C: second moments of an updated module's inputs over a text corpus",
    "batch": "many edits at once (`--mode batch`, MEMIT-style): the layers, their weight against C, the passes",
    "sequence": "edits one after another (`--mode sequential`): how earlier edits are kept",
    "lora": "the LoRA fine-tuning baseline (`method: lora`)",
    "ft": "the constrained fine-tuning baseline of the MLP weights (`method: ft`, FT-L)",
}


@dataclass(frozen=True)
class Rule:
    """The values a setting accepts: ``text`` says which (in messages and docs), ``test``
    checks a value, or with ``each`` every item of a list."""

    text: str
    test: Callable[[Any], bool]
    each: bool = False

    def holds(self, value: Any) -> bool:
        if value is None:
            return True
        try:
            if self.each and isinstance(value, list):
                return all(self.test(v) for v in value)
            return bool(self.test(value))
        except TypeError:  # a value of the wrong type (set in code)
            return False


def at_least(lo: int | float, each: bool = False) -> Rule:
    return Rule(("each " if each else "") + ("zero or more" if lo == 0 else f"at least {lo}"),
                lambda x: x >= lo, each)


def between(lo: float, hi: float, open_ends: bool = False) -> Rule:
    if open_ends:
        return Rule(f"above {lo} and below {hi}", lambda x: lo < x < hi)
    return Rule(f"from {lo} to {hi}", lambda x: lo <= x <= hi)


POSITIVE = Rule("positive", lambda x: x > 0)


@dataclass(frozen=True)
class Setting:
    group: str
    help: str  # one line
    unit: str = ""
    valid: Rule | None = None  # None: any value of its type (a choice: one of its values)
    methods: tuple[str, ...] = ALL  # the methods in which it acts
    experimental: bool = False
    key: str = ""  # its name in the group; the field's name when empty


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, group: str,
            help: str, unit: str = "", valid: Rule | None = None, methods: tuple[str, ...] = ALL,
            experimental: bool = False, key: str = "") -> Any:
    """A dataclass field with its :class:`Setting`."""
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}")
    meta = {"setting": Setting(group, help, unit, valid, tuple(methods), experimental, key)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    """One setting: its attribute, type, default and :class:`Setting`."""

    name: str
    hint: Any
    default: Any
    setting: Setting

    @property
    def group(self) -> str:
        return self.setting.group

    @property
    def key(self) -> str:
        return self.setting.key or self.name

    @property
    def path(self) -> str:
        """Its key under ``edit:``: ``method``, ``batch.lambda``."""
        return self.key if self.group == GENERAL else f"{self.group}.{self.key}"

    def acts_in(self, method: str) -> bool:
        return str(method) in self.setting.methods


@functools.cache
def specs(cls: type) -> tuple[Spec, ...]:
    """``cls``'s settings, by group (in :data:`GROUPS` order), then in field order."""
    hints = typing.get_type_hints(cls)
    out = [Spec(f.name, hints[f.name], f.default_factory() if f.default is dataclasses.MISSING else f.default,
                f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]
    order = list(GROUPS)
    return tuple(sorted(out, key=lambda s: order.index(s.group)))


def flat_mapping(cls: type) -> dict[str, str]:
    """The old flat keys and the grouped key each is read as: ``batch_lambda -> batch.lambda``."""
    return {s.name: s.path for s in specs(cls) if s.name != s.path}


def type_text(hint: Any) -> str:
    """A type as the docs write it: ``int``, ``list of int or null``, ``mean | contexts``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(type_text(a) for a in args) + (" or null" if len(args) < len(typing.get_args(hint)) else "")
    if origin is list:
        (arg,) = typing.get_args(hint)
        return f"list of {type_text(arg)}"
    if isinstance(hint, type) and issubclass(hint, Choice):
        return " | ".join(hint.values())
    return getattr(hint, "__name__", str(hint))


def value_text(value: Any) -> str:
    """A value as a recipe writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Choice):
        return str(value)
    if isinstance(value, str):
        return repr(value) if value == "" or "{" in value or ":" in value else value
    return repr(value)


def check_value(spec: Spec, value: Any, where: str) -> None:
    rule = spec.setting.valid
    if rule is not None and not rule.holds(value):
        raise RecipeError(f"{where} must be {rule.text}, got {shown(value)}")


def check_config(obj: Any, prefix: str = "edit") -> None:
    """Every setting of ``obj`` (set in code) within its valid values; an error names the attribute."""
    for s in specs(type(obj)):
        check_value(s, getattr(obj, s.name), f"{prefix}.{s.name}")


def _put(given: dict[str, tuple[str, Any]], spec: Spec, base: str, key: str, value: Any) -> None:
    """Record ``value`` for ``spec``, written as ``key`` in section ``base``; twice is an error."""
    if spec.name in given:
        first = given[spec.name][0].removeprefix(base + ".")
        raise RecipeError(f"{base}: {first} and {key} set the same setting ({spec.path}): give it once")
    given[spec.name] = (f"{base}.{key}", value)


def _read_group(cls: type, group: str, data: Any, where: str, given: dict[str, tuple[str, Any]]) -> None:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}.{group}: expected a mapping of the {group} settings, got {shown(data)}")
    own = {s.key: s for s in specs(cls) if s.group == group}
    unknown = [k for k in data if k not in own]
    if unknown:  # the closest among this group's keys, then the other groups' and the old flat names
        others = [s for s in specs(cls) if s.group != group]
        shown_as = {**{s.name: s.path for s in others}, **{s.key: s.path for s in others},
                    **{k: f"{group}.{k}" for k in own}}
        raise unknown_keys(f"{where}.{group}", unknown, list(own), shown_as=shown_as,
                           extra=[s.key for s in others] + [s.name for s in others])
    for k, v in data.items():
        _put(given, own[k], where, f"{group}.{k}", v)


def read_section(cls: type, data: Any, where: str, method: str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from a recipe's ``edit:`` section ``data``: grouped keys,
    or old flat ones (read through :func:`flat_mapping`, with a warning naming the new key).
    Unknown keys, wrong types, values out of range, and settings that do nothing for the
    chosen method (``method``, else the section's, else the default) are errors naming the
    key as written and ``where`` (``"<file>: edit"``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    everything = specs(cls)
    top = {s.key: s for s in everything if s.group == GENERAL}
    by_name = {s.name: s for s in everything}
    if method is not None:
        method = check_type(method, by_name[SELECTOR].hint, "--method")
    given: dict[str, tuple[str, Any]] = {}
    flat, unknown = [], []
    for k, v in data.items():
        if k in GROUPS and k != GENERAL:
            _read_group(cls, k, v, where, given)
        elif k in top:
            _put(given, top[k], where, k, v)
        elif k in by_name:
            flat.append(by_name[k])
            _put(given, by_name[k], where, k, v)
        else:
            unknown.append(k)
    if unknown:
        groups = [g for g in GROUPS if g != GENERAL]
        raise unknown_keys(where, unknown, [*top, *groups], shown_as={**{s.key: s.path for s in everything},
                                                                       **flat_mapping(cls)},
                           extra=[s.name for s in everything] + [s.key for s in everything])
    if flat:
        moved = ", ".join(f"{s.name} -> {s.path}" for s in flat)
        warn(f"{where}: old flat key(s) read through the mapping {moved}; write them in their groups "
             f"(e.g. {flat[0].group}: {{{flat[0].key}: ...}}), see docs/configuration.md")
    out = {}
    for name, (at, value) in given.items():
        spec = by_name[name]
        out[name] = check_type(value, spec.hint, at)
        check_value(spec, out[name], at)
    chosen = str(method or out.get(SELECTOR) or by_name[SELECTOR].default)
    idle = [(at, by_name[n]) for n, (at, _) in given.items() if not by_name[n].acts_in(chosen)]
    if idle:
        how = " (--method)" if method else ("" if SELECTOR in out else f" (the default; set {SELECTOR} to choose)")
        each = "; ".join(f"{at.removeprefix(where + '.')} (acts in {', '.join(s.setting.methods)})" for at, s in idle)
        raise RecipeError(f"{where}: setting(s) that do nothing for method {chosen}{how}: {each}; remove them "
                          "or choose a method they act in")
    return out


def unused_for(obj: Any, method: str) -> list[str]:
    """The settings of ``obj`` changed from their defaults that do nothing for ``method``."""
    return [s.path for s in specs(type(obj)) if not s.acts_in(method) and getattr(obj, s.name) != s.default]
