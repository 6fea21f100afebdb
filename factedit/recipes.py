"""Recipes: YAML files of hyperparameters, loaded into validated dataclasses.

Unknown keys and sections and wrong types are errors that name the key, the file and the
closest valid name, so a typo never silently falls back to a default. YAML is read with
``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from factedit.errors import FactEditError, shown
from factedit.paths import world_file

T = TypeVar("T")
C = TypeVar("C", bound="Choice")


# the top-level sections a recipe may hold: a world recipe all of them, a model's recipe
# analysis and edit (read by `factedit locate`/`audit` and `factedit edit`)
SECTIONS = ("world", "model", "train", "analysis", "edit")


class RecipeError(FactEditError, ValueError):
    """A recipe file or section is malformed."""


class RecipeWarning(UserWarning):
    """A recipe setting that is still read, but should be written another way."""


def warn(message: str) -> None:
    warnings.warn(message, RecipeWarning, stacklevel=3)


def warning_lines() -> None:
    """Show recipe warnings as one line ``warning: ...`` on stderr each (the command line's
    form), as they happen; other warnings as Python does."""
    default = warnings.showwarning
    if getattr(default, "recipe_lines", False):
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, RecipeWarning):
            (file or sys.stderr).write(f"warning: {message}\n")
        else:
            default(message, category, filename, lineno, file, line)

    show.recipe_lines = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def suggestion(name: str, candidates: typing.Iterable[str], shown_as: dict[str, str] | None = None) -> str:
    """`` (did you mean X?)`` for the candidate closest to ``name``, shown through ``shown_as``
    (e.g. an old name as its new one); empty when none is close."""
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {(shown_as or {}).get(close[0], close[0])}?)"


def unknown_keys(where: str, unknown: typing.Iterable[str], allowed: typing.Iterable[str], what: str = "key(s)",
                 shown_as: dict[str, str] | None = None, extra: typing.Iterable[str] = ()) -> RecipeError:
    """The error for keys not among ``allowed``: each with the closest name among ``allowed``
    and ``extra`` (e.g. old names), shown through ``shown_as``; then the allowed names."""
    allowed = list(allowed)
    candidates = allowed + [k for k in extra if k not in allowed]
    names = sorted(str(k) for k in unknown)
    each = [(k if len(k) <= 40 else shown(k)) + suggestion(k, candidates, shown_as) for k in names[:10]]
    more = ", ..." if len(names) > 10 else ""
    return RecipeError(f"{where}: unknown {what} {', '.join(each)}{more}; "
                       f"allowed {what.removesuffix('(s)')}s are {', '.join(allowed)}")


class Choice(str, Enum):
    """A recipe field with a fixed set of string values. A member is its string: it compares
    equal to it, prints as it (also in f-strings, on every Python) and is written as it in JSON,
    so recipes and manifests hold the same plain strings as before."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str(self), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls: type[C], value: Any, where: str) -> C:
        """``value`` as a member; anything else is an error naming ``where`` and the allowed values."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected one of {', '.join(cls.values())}, got {shown(value)}")


def check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(value, a, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: expected {hint}, got {shown(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {shown(value)}")
        (arg,) = typing.get_args(hint) or (Any,)
        return [check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {shown(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, Choice):
        return hint.parse(value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {shown(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {shown(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {shown(value)}")
        return value
    return value


def from_dict(cls: type[T], data: Any, where: str = "recipe") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types. A class
    with its own reader (a ``from_recipe(data, where)`` class method) is read by it."""
    reader = getattr(cls, "from_recipe", None)
    if reader is not None:
        return reader(data, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise unknown_keys(where, unknown, sorted(fields))
    kwargs = {k: check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


MAX_RECIPE_VALUES = 100_000  # scalars and containers a recipe may expand to (YAML aliases included)


def _count_values(data: Any, budget: int) -> int:
    """How many values ``data`` expands to, counting a value shared through a YAML alias once per
    use, stopping (and returning more than ``budget``) as soon as the budget is spent: so an
    alias bomb is refused in bounded time, without expanding it."""
    n, stack = 0, [data]
    while stack:
        v = stack.pop()
        n += 1
        if n > budget:
            return n
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return n


def load_yaml(path: str | Path) -> dict:
    from factedit.io import MAX_RECIPE_BYTES, read_text

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        text = read_text(path, "recipe file", MAX_RECIPE_BYTES)
    except RecipeError:
        raise
    except FactEditError as exc:
        raise RecipeError(str(exc)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise RecipeError(f"recipe file {path} is not valid YAML: {first[:300]}") from None
    except RecursionError:
        raise RecipeError(f"recipe file {path} is nested too deeply to be read: check the file") from None
    if _count_values(data, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise RecipeError(f"recipe file {path} expands to more than {MAX_RECIPE_VALUES} values (YAML aliases "
                          "repeated?): a recipe is a few keys; check the file")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise unknown_keys(f"recipe file {path}", unknown, SECTIONS, what="section(s)")
    return data


def recipes_dir() -> Path | None:
    """The shipped recipes: beside the package (a source checkout or an editable install), or
    where a wheel installs them (``<prefix>/share/factedit/recipes``)."""
    import sys

    for d in (Path(__file__).resolve().parent.parent / "recipes", Path(sys.prefix) / "share" / "factedit" / "recipes"):
        if d.is_dir():
            return d
    return None


def model_recipe_section(model, section: str) -> tuple[dict, str]:
    """The ``section`` ("analysis" or "edit") of the recipe that comes with a model, and where
    it was read: a world model's ``world.json`` (meta.recipe), or the shipped recipe that a
    named real model's ``factedit-model.json`` names. ``({}, "defaults")`` otherwise."""
    import json

    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    world = world_file(model)
    if world is not None:
        return json.loads(world.read_text()).get("meta", {}).get("recipe", {}).get(section, {}), \
            f"{world} meta.recipe.{section}"
    manifest = folder / "factedit-model.json"
    if manifest.is_file():
        name = json.loads(manifest.read_text()).get("recipe")
        rdir = recipes_dir()
        if name and rdir is not None and (rdir / f"{name}.yaml").is_file():
            path = rdir / f"{name}.yaml"
            return load_yaml(path).get(section, {}) or {}, f"{path}: {section}"
    return {}, "defaults"
