"""Edit requests: what to change, and the prompts to check it on.

A request file is JSON (a list, or one object) or JSONL, of either
- CounterFact records: ``{"case_id", "requested_rewrite": {"prompt", "subject",
  "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts"}``;
- flat records: ``{"prompt", "subject", "target_new"}`` with optional ``target_true``,
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``case_id``.
Errors name the record (its index and case id) and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError, shown
from factedit.validate import case_id_problem, prompts_problem, request_problem

__all__ = ["EditRequest", "RequestError", "load_requests", "parse_record", "request_problem"]


class RequestError(FactEditError):
    pass


@dataclass
class EditRequest:
    prompt: str  # template with {} for the subject, or a full prompt containing it
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)  # full prompts
    neighborhood_prompts: list[str] = field(default_factory=list)  # full prompts, other subjects
    case_id: str | int | None = None

    def __post_init__(self) -> None:
        problem = (case_id_problem(self.case_id)
                   or request_problem(self.prompt, self.subject, self.target_new, self.target_true)
                   or prompts_problem(self.paraphrase_prompts, "paraphrase_prompts", self.subject)
                   or prompts_problem(self.neighborhood_prompts, "neighborhood_prompts", self.subject,
                                      [self.filled_prompt, *self.paraphrase_prompts]))
        if problem is not None:
            raise RequestError(f"request {shown(self.case_id)}: {problem}" if self.case_id is not None
                               else f"request: {problem}")

    @property
    def filled_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt

    @property
    def template(self) -> str:
        """The prompt with ``{}`` for the subject."""
        return self.prompt if "{}" in self.prompt else self.prompt.replace(self.subject, "{}", 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_requests(requests: list[EditRequest], per_request: int, seed: int = 0) -> list[EditRequest]:
    """Prompts a batch must leave as they are: each request's template asked about other
    subjects of the batch (``per_request`` of them), never a (template, subject) pair that the
    batch itself edits. They cover both kinds of collateral damage: the same relation for
    another subject, and another relation for an edited subject. Their keys join the
    least-squares solve with a zero residual. Fewer come back when no such pair exists."""
    edited = {(r.template, r.subject) for r in requests}
    subjects = list(dict.fromkeys(r.subject for r in requests))
    rng = random.Random(seed)
    free: dict[str, list[str]] = {}  # template -> subjects it may be asked about
    held: list[EditRequest] = []
    for r in requests:
        if r.template not in free:
            free[r.template] = [s for s in subjects if (r.template, s) not in edited]
        pool = free[r.template]
        held += [EditRequest(r.template, s, r.target_new) for s in rng.sample(pool, min(per_request, len(pool)))]
    return held


def check_conflicts(requests: list[EditRequest]) -> None:
    """Refuse two requests that ask the same prompt about the same subject for different new
    targets: both cannot be fitted, and reporting both as fitted would be false."""
    seen: dict[tuple[str, str], tuple[int, EditRequest]] = {}
    for i, r in enumerate(requests):
        key = (r.filled_prompt.strip(), r.subject.strip())
        if key in seen and seen[key][1].target_new.strip() != r.target_new.strip():
            j, other = seen[key]
            raise RequestError(
                f"requests {j} ({other.case_id!r}) and {i} ({r.case_id!r}) conflict: both edit "
                f"{shown(r.filled_prompt)} about {shown(r.subject)}, to {shown(other.target_new)} and to "
                f"{shown(r.target_new)}: keep one of them")
        seen.setdefault(key, (i, r))


def _str(rec: dict, key: str, where: str, optional: bool = False) -> str | None:
    if key not in rec:
        if optional:
            return None
        raise RequestError(f"{where}: missing field {key!r}")
    v = rec[key]
    if v is None and optional:
        return None
    if isinstance(v, dict) and "str" in v:  # CounterFact's {"str": ..., "id": ...}
        v = v["str"]
    if not isinstance(v, str):
        raise RequestError(f"{where}: field {key!r} must be a string (or {{\"str\": ...}}), got {shown(v)}")
    return v


def _str_list(rec: dict, key: str, where: str, subject: str, edited: list[str] = ()) -> list[str]:
    v = rec.get(key, [])
    problem = prompts_problem(v, key, subject, edited)
    if problem is not None:
        raise RequestError(f"{where}: {problem}")
    return list(v)


def parse_record(rec: Any, index: int) -> EditRequest:
    where = f"record {index}"
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected an object, got {type(rec).__name__}")
    case_id = rec.get("case_id")
    if case_id is not None:
        where += f" (case_id {shown(case_id)})"
        if case_id_problem(case_id) is not None:
            raise RequestError(f"{where}: {case_id_problem(case_id)}")
    if "requested_rewrite" in rec:
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise RequestError(f"{where}: field 'requested_rewrite' must be an object")
        inner = f"{where}, requested_rewrite"
        prompt, subject = _str(rw, "prompt", inner), _str(rw, "subject", inner)
        new, true = _str(rw, "target_new", inner), _str(rw, "target_true", inner, optional=True)
    else:
        prompt, subject = _str(rec, "prompt", where), _str(rec, "subject", where)
        new, true = _str(rec, "target_new", where), _str(rec, "target_true", where, optional=True)
    problem = request_problem(prompt, subject, new, true)
    if problem is not None:
        raise RequestError(f"{where}: {problem}")
    para = _str_list(rec, "paraphrase_prompts", where, subject)
    filled = prompt.replace("{}", subject) if "{}" in prompt else prompt
    neighbours = _str_list(rec, "neighborhood_prompts", where, subject, [filled, *para])
    return EditRequest(prompt, subject, new, true, para, neighbours, rec.get("case_id", index))


def load_requests(path: str | Path) -> list[EditRequest]:
    from factedit.io import read_text
    from factedit.validate import check_path_arg

    path = check_path_arg(path, "request file")
    text = read_text(path, "request file", error=RequestError)
    lines: list[int] | None = None  # JSONL: each record's line
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except RecursionError:
        raise RequestError(f"request file {path} is nested too deeply to be read: check the file") from None
    except json.JSONDecodeError as whole:
        records, lines = [], []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            lines.append(i)
            try:
                records.append(json.loads(line))
            except RecursionError:
                raise RequestError(f"request file {path}: line {i} is nested too deeply to be read") from None
            except json.JSONDecodeError as exc:
                first = str(whole) if i == 1 else str(exc)
                raise RequestError(f"request file {path} is neither JSON nor JSONL: line {i}: {first}") from exc
    if not records:
        raise RequestError(f"request file {path} holds no requests")
    out = []
    for i, r in enumerate(records):
        try:
            out.append(parse_record(r, i))
        except RequestError as exc:
            raise RequestError(f"request file {path}" + (f" line {lines[i]}" if lines else "") + f": {exc}") from None
    try:
        check_conflicts(out)
    except RequestError as exc:
        raise RequestError(f"request file {path}: {exc}") from None
    return out
