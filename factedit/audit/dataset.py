"""The facts an audit runs over: the demo world, ROME's known facts, CounterFact, or flat
records.

Every prompt becomes one :class:`AuditFact`. Prompts of the same underlying fact (the same
subject and relation, through another template or a paraphrase) share a ``group``, which the
robustness aggregate compares.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from factedit.errors import FactEditError, shown
from factedit.io import read_text


class DatasetError(FactEditError):
    pass


@dataclass(frozen=True)
class AuditFact:
    index: int  # position in the dataset: the key that resumption and sharding use
    prompt: str  # the full prompt, subject included
    subject: str
    attribute: str  # the true attribute (what the model must predict to "know" the fact)
    relation: str
    group: str  # facts sharing it are the same fact through other templates or paraphrases
    source_id: str = ""  # the record's own id in its dataset
    related: str | None = None  # text of the subject's related tokens, for the attribute rate


def world_facts(world, heldout: bool = False) -> list[AuditFact]:
    """Every (entity, relation, template) of a synthetic world, entity-major, so that
    ``--limit`` keeps whole entities with all their templates."""
    out: list[AuditFact] = []
    for e in world.entities:
        for rid, rel in world.relations.items():
            templates = rel.templates + (rel.heldout_templates if heldout else [])
            for t_i, t in enumerate(templates):
                out.append(AuditFact(len(out), t.format(e.name), e.name, e.facts[rid], rid,
                                     group=f"{e.name}|{rid}", source_id=f"{e.name}|{rid}|{t_i}"))
    return out


BUNDLED = ("known_1000",)


def bundled(path: str | Path) -> Path:
    """A bundled dataset's file for its name (``known_1000``: ROME's known facts, shipped in
    ``factedit/data``), unless a file of that name exists; any other path unchanged."""
    p = Path(path)
    if str(path) in BUNDLED and not p.exists():
        return Path(__file__).resolve().parent.parent / "data" / f"{path}.json"
    return p


def load_facts(path: str | Path) -> list[AuditFact]:
    """ROME's known facts (``known_1000.json``), CounterFact records, or flat records with
    ``prompt`` (or ``template``), ``subject`` and ``attribute`` (``target``), as JSON or JSONL."""
    path = bundled(path)
    if not path.is_file():
        raise DatasetError(f"--dataset {path}: no such file; give a JSON or JSONL file of facts, or "
                           f"{' or '.join(BUNDLED)}")
    try:
        text = read_text(path, "--dataset")
    except FactEditError as exc:
        raise DatasetError(str(exc)) from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"--dataset {path} is not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    except RecursionError:
        raise DatasetError(f"--dataset {path} is nested too deeply to be read: check the file") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise DatasetError(f"--dataset {path} must hold a non-empty list of fact records")
    out: list[AuditFact] = []
    for i, rec in enumerate(records):
        for fact in _parse(rec, i, path):
            out.append(AuditFact(len(out), fact["prompt"], fact["subject"], fact["attribute"], fact["relation"],
                                 fact["group"], fact["source_id"], fact.get("related")))
    return out


def _field(rec: dict, names: tuple[str, ...], i: int, path: Path, where: str = "") -> str:
    for n in names:
        if isinstance(rec.get(n), str) and rec[n].strip():
            return rec[n]
        if isinstance(rec.get(n), dict) and isinstance(rec[n].get("str"), str):  # CounterFact targets
            return rec[n]["str"]
    raise DatasetError(f"{path}: record {i}{where} has no {' or '.join(map(repr, names))} "
                       "(a non-empty string): add it or fix the record")


def _parse(rec, i: int, path: Path) -> list[dict]:
    if not isinstance(rec, dict):
        raise DatasetError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
    if "requested_rewrite" in rec:  # CounterFact: the true fact, its prompt and its paraphrases
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise DatasetError(f"{path}: record {i} field 'requested_rewrite' must be an object")
        subject = _field(rw, ("subject",), i, path, " requested_rewrite")
        template = _field(rw, ("prompt",), i, path, " requested_rewrite")
        attribute = _field(rw, ("target_true",), i, path, " requested_rewrite")
        relation = str(rw.get("relation_id", ""))
        cid = str(rec.get("case_id", i))
        prompts = [_fill(template, subject, i, path)]
        para = rec.get("paraphrase_prompts", [])
        prompts += [p for p in (para if isinstance(para, list) else []) if isinstance(p, str) and subject in p]
        return [dict(prompt=p, subject=subject, attribute=attribute, relation=relation, group=cid,
                     source_id=f"{cid}:{k}") for k, p in enumerate(prompts)]
    subject = _field(rec, ("subject",), i, path)
    attribute = _field(rec, ("attribute", "target", "target_true"), i, path)
    prompt = rec.get("prompt") if isinstance(rec.get("prompt"), str) and rec["prompt"].strip() else None
    if prompt is None:
        prompt = _fill(_field(rec, ("prompt", "template"), i, path), subject, i, path)
    relation = str(rec.get("relation_id", rec.get("relation", "")))
    sid = str(rec.get("known_id", rec.get("id", i)))
    group = str(rec.get("group", f"{subject}|{relation}" if relation else sid))
    related = rec.get("related") if isinstance(rec.get("related"), str) else None
    return [dict(prompt=prompt, subject=subject, attribute=attribute, relation=relation, group=group,
                 source_id=sid, related=related)]


def _fill(template: str, subject: str, i: int, path: Path) -> str:
    if "{}" in template:  # replaced, never str.format: '{name}', '{0}' or a lone '{' stay as written
        return template.replace("{}", subject, 1)
    if subject in template:
        return template
    raise DatasetError(f"{path}: record {i}: the prompt {shown(template)} has neither '{{}}' nor the subject "
                       f"{shown(subject)}: put '{{}}' where the subject goes")


def template_of(prompt: str, subject: str) -> str | None:
    """The prompt with its (first) subject occurrence replaced by '{}'."""
    return prompt.replace(subject, "{}", 1) if subject in prompt else None


def relation_templates(facts: list[AuditFact]) -> dict[str, list[str]]:
    """Per relation, its templates in the dataset (derived from the prompts), most used first."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for f in facts:
        t = template_of(f.prompt, f.subject)
        if t is not None:
            counts[f.relation][t] += 1
    return {r: [t for t, _n in c.most_common()] for r, c in counts.items()}


def with_paraphrases(facts: list[AuditFact], n: int) -> list[AuditFact]:
    """Each fact followed by up to ``n`` paraphrases: its relation's other templates in the
    dataset (most used first) filled with its subject, in the fact's group (so that the audit's
    robustness aggregate compares them). Indices are renumbered in the new order."""
    templates = relation_templates(facts)
    have = {(f.group, f.prompt) for f in facts}
    out: list[AuditFact] = []
    for f in facts:
        out.append(replace(f, index=len(out)))
        own = template_of(f.prompt, f.subject)
        added = 0
        for t in templates.get(f.relation, []):
            if added >= n:
                break
            prompt = t.replace("{}", f.subject, 1)
            if t == own or (f.group, prompt) in have:
                continue
            have.add((f.group, prompt))
            out.append(replace(f, index=len(out), prompt=prompt, source_id=f"{f.source_id}:para{added}"))
            added += 1
    return out
