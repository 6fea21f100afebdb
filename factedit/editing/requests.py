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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factedit.errors import FactEditError


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
        where = f"request {self.case_id!r}" if self.case_id is not None else "request"
        for name in ("prompt", "subject", "target_new"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise RequestError(f"{where}: field {name!r} must be a non-empty string, got {v!r}")
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise RequestError(f"{where}: the subject {self.subject!r} does not occur in the prompt "
                               f"{self.prompt!r}; write the prompt as a template with '{{}}'")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise RequestError(f"{where}: target_new equals target_true ({self.target_new!r}): nothing to edit")

    @property
    def filled_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        raise RequestError(f"{where}: field {key!r} must be a string (or {{\"str\": ...}}), got {v!r}")
    return v


def _str_list(rec: dict, key: str, where: str) -> list[str]:
    v = rec.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RequestError(f"{where}: field {key!r} must be a list of strings")
    return list(v)


def parse_record(rec: Any, index: int) -> EditRequest:
    where = f"record {index}"
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected an object, got {type(rec).__name__}")
    if rec.get("case_id") is not None:
        where += f" (case_id {rec['case_id']!r})"
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
    try:
        return EditRequest(prompt, subject, new, true, _str_list(rec, "paraphrase_prompts", where),
                           _str_list(rec, "neighborhood_prompts", where), rec.get("case_id", index))
    except RequestError as exc:
        raise RequestError(f"{where}: {str(exc).split(': ', 1)[-1]}") from exc


def load_requests(path: str | Path) -> list[EditRequest]:
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"request file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError as whole:
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                first = str(whole) if i == 1 else str(exc)
                raise RequestError(f"request file {path} is neither JSON nor JSONL: line {i}: {first}") from exc
    if not records:
        raise RequestError(f"request file {path} holds no requests")
    return [parse_record(r, i) for i, r in enumerate(records)]
