"""`audit`: locate the recall circuit of every fact of a dataset, resumably, on one or many
processes, then aggregate.

Output folder:
- ``audit.json``  what was audited (model fingerprint, dataset, analysis config): a rerun with
  the same folder resumes only if these match;
- ``facts.jsonl`` one record per fact, appended as computed (shards under data parallelism);
- ``summary.json``, ``*.png``, ``report.html`` written at the end (atomically).

Facts the model does not know (its top-1 token is not the attribute's first token) are
recorded with ``status: "unknown"`` and left out of the aggregates, as in the paper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from factedit.analysis.attribute_rate import related_tokens
from factedit.analysis.circuit import LocateConfig
from factedit.analysis.hooks import upcast
from factedit.analysis.locate import check_length, locate
from factedit.analysis.rerun import clean_runs
from factedit.analysis.spans import target_token_ids, tokenize_with_subject
from factedit.audit.dataset import AuditFact
from factedit.audit.store import FACTS, FactStore, merge
from factedit.errors import FactEditError, OutputDirError, shown
from factedit.io import MAX_JSON_BYTES, atomic_write_text, dumps_json, read_json
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint

FORMAT = "factedit.audit/1"
OWN_FILES = ("audit.json", FACTS, "summary.json", "report.html")


@dataclass
class Shard:
    """This process's place in a data-parallel run (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    state: object = None  # accelerate's PartialState under `accelerate launch`

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def current_shard() -> Shard:
    """Rank and world size from `accelerate launch` (or torchrun); alone otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes
    return Shard(state.process_index, state.num_processes, state)


def _r(x: float) -> float:
    return round(float(x), 6)


def _rs(xs) -> list | None:
    return None if xs is None else [_r(x) for x in xs]


@torch.no_grad()
def audit_fact(fact: AuditFact, model, tok, config: LocateConfig, fingerprint: str,
               related: set[int] | None) -> dict:
    """One fact's record: its recall circuit if the model knows it, else why not."""
    return next(audit_facts([fact], model, tok, config, fingerprint, lambda f: related))


@torch.no_grad()
def audit_facts(facts: Sequence[AuditFact], model, tok, config: LocateConfig, fingerprint: str,
                related_of=None) -> Iterator[dict]:
    """The facts' records, in order, as they are computed. Their clean passes are shared (one
    forward pass per prompt length: no padding, so each record is the one the fact gives alone up
    to float32 rounding, see :mod:`factedit.audit.compare`); each fact the model knows is then
    located on its own clean run."""
    adapter = ModelLayout(model)
    recs, ready = [], []
    for fact in facts:
        rec = {"index": fact.index, "id": fact.source_id, "prompt": fact.prompt, "subject": fact.subject,
               "attribute": fact.attribute, "relation": fact.relation, "group": fact.group}
        if fact.related is not None:
            rec["related_sha"] = _sha(fact.related)
        try:
            tp = tokenize_with_subject(tok, fact.prompt, fact.subject)
            check_length(model, tp)
            want = target_token_ids(tok, tp.prompt, fact.attribute)[0]
        except FactEditError as exc:
            recs.append({**rec, "status": "error", "error": str(exc)})
            continue
        recs.append(rec)
        ready.append((len(recs) - 1, tp, want))
    cleans = dict(zip((i for i, _, _ in ready), clean_runs(adapter, [tp.input_ids for _, tp, _ in ready]),
                      strict=True))
    todo = {i: (tp, want) for i, tp, want in ready}
    for i, (fact, rec) in enumerate(zip(facts, recs, strict=True)):
        if i not in todo:
            yield rec
            continue
        tp, want = todo[i]
        clean = cleans.pop(i)  # kept until located: locate reuses it
        probs = upcast(clean.logits).softmax(-1)
        pred = int(probs.argmax())
        rec.update(prediction=tok.decode([pred]), prediction_prob=_r(probs[pred]), attribute_prob=_r(probs[want]))
        if pred != want:
            yield {**rec, "status": "unknown"}
            continue
        related = related_of(fact) if related_of is not None else None
        c = locate(tp.prompt, fact.subject, model=model, tokenizer=tok, related=related, config=config,
                   fingerprint=fingerprint, clean=clean, extraction=False, heads="extraction")
        by_pos = c.attribute_rate_by_position
        yield {
            **rec,
            "status": "known",
            "n_tokens": len(tp.input_ids),
            "subject_span": list(tp.subject_span),
            "knockout": {s: _rs(c.knockout.curve(s)) for s in ("subject", "non_subject", "last")},
            "attribute_rate": None if by_pos is None else {k: _rs(v) for k, v in by_pos.items()},
            "projection_rank": {k: c.projection[f"{k}_rank"] for k in ("resid", "attn", "mlp")},
            "extraction_heads": [[h.layer, h.head, _r(h.score)] for h in c.extraction_heads],
            "enrichment_mlps": [[m.layer, _r(m.score)] for m in c.enrichment_mlps],
            "sublayer_knockout": {k: _rs(c.sublayer_knockout.prob_change[k]) for k in ("mlp", "attn")},
        }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def belongs(rec: dict, fact: AuditFact) -> bool:
    """Whether a kept record was computed for ``fact`` (the same prompt, subject, attribute,
    relation, group, id and related text): after the dataset file was edited or the selection
    changed (e.g. ``--heldout`` renumbers the facts), a record under the same index may not."""
    return (rec.get("prompt") == fact.prompt and rec.get("subject") == fact.subject
            and rec.get("attribute") == fact.attribute and rec.get("relation") == fact.relation
            and rec.get("group") == fact.group and rec.get("id") == fact.source_id
            and rec.get("related_sha") == (None if fact.related is None else _sha(fact.related)))


def _num(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _curve(x, n: int) -> bool:
    return isinstance(x, list) and len(x) == n and all(_num(v) for v in x)


def well_formed(rec: dict, n_layers: int, n_heads: int) -> bool:
    """Whether a record read back from disk has the shape this audit writes (a hand-edited or
    tampered line is recomputed rather than crash the summary)."""
    try:
        if rec.get("status") == "error":
            return isinstance(rec.get("error"), str)
        if not (isinstance(rec.get("prediction"), str) and _num(rec.get("prediction_prob"))
                and _num(rec.get("attribute_prob"))):
            return False
        if rec["status"] == "unknown":
            return True
        if rec["status"] != "known":
            return False
        span = rec["subject_span"]
        ok = (type(rec["n_tokens"]) is int and isinstance(span, list) and len(span) == 2
              and all(type(v) is int for v in span) and 0 <= span[0] < span[1] <= rec["n_tokens"])
        ok = ok and all(_curve(rec["knockout"][k], n_layers) for k in ("subject", "non_subject", "last"))
        ok = ok and all(_curve(rec["sublayer_knockout"][k], n_layers) for k in ("mlp", "attn"))
        ar = rec["attribute_rate"]
        ok = ok and (ar is None or (isinstance(ar, dict) and all(_curve(v, n_layers + 1) for v in ar.values())))
        pr = rec["projection_rank"]
        ok = ok and isinstance(pr, dict) and all(k in pr for k in ("resid", "attn", "mlp"))
        ok = ok and all(isinstance(h, list) and len(h) == 3 and type(h[0]) is int and type(h[1]) is int
                        and 0 <= h[0] < n_layers and 0 <= h[1] < n_heads and _num(h[2])
                        for h in rec["extraction_heads"])
        ok = ok and all(isinstance(m, list) and len(m) == 2 and type(m[0]) is int and 0 <= m[0] < n_layers
                        and _num(m[1]) for m in rec["enrichment_mlps"])
        return bool(ok)
    except (KeyError, TypeError, AttributeError):
        return False


def prepare_dir(out: Path, header: dict, overwrite: bool) -> None:
    """Create the folder, or check that it holds an audit of the same model, dataset and
    config (then the run resumes, or extends it to another selection, e.g. a larger
    ``--limit``: records are keyed by the fact's index in the dataset). Other non-empty
    folders are refused unless ``overwrite``, which removes only factedit's own audit files."""
    meta = out / "audit.json"
    if meta.is_file() and not overwrite:
        try:
            old = read_json(meta, "audit header", MAX_JSON_BYTES)
        except FactEditError as exc:
            raise OutputDirError(f"{meta} is corrupt ({exc}): pass --overwrite to start the audit again") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise OutputDirError(f"{meta} is corrupt (not an audit header of format {FORMAT}): pass --overwrite to "
                                 "start the audit again")
        for key in ("model_fingerprint", "dataset", "config"):
            if old.get(key) != header.get(key):
                raise OutputDirError(
                    f"--out {out} holds an audit with another {key.replace('_', ' ')} "
                    f"({shown(old.get(key))} vs {shown(header.get(key))}): use a new folder, or --overwrite to restart"
                )
        if old != header:  # another selection of the same dataset (e.g. a larger --limit): extend
            atomic_write_text(meta, dumps_json(header, indent=1))
        return
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(f"--out {out} exists and is not empty: choose a new folder or pass --overwrite")
        from factedit.audit.report import FIGURES

        # only the files an audit writes: the user's own (other figures included) stay
        for p in list(out.glob("facts.shard*-of*.jsonl")) + [out / n for n in (*OWN_FILES, *FIGURES)]:
            if p.is_file() and not p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, dumps_json(header, indent=1))


def select(facts: Sequence[AuditFact], relations: Sequence[str] | None, limit: int | None) -> list[AuditFact]:
    chosen = [f for f in facts if not relations or f.relation in relations]
    if relations and not chosen:
        have = sorted({f.relation for f in facts})
        raise FactEditError(f"--relations {','.join(relations)} matches no fact; relations here: {', '.join(have)}")
    return chosen[:limit] if limit is not None else chosen


def run_audit(facts: Sequence[AuditFact], *, model, tokenizer, out: str | Path, config: LocateConfig,
              dataset_name: str, related_of=None, overwrite: bool = False, shard: Shard | None = None,
              progress: bool = True, log=print, batch: int = 32) -> dict | None:
    """Audit ``facts`` into ``out``; returns the summary on the main process (None elsewhere).

    ``related_of(fact)`` gives the fact's related-token text or ids for the attribute rate.
    ``batch`` facts at a time share their clean passes (see :func:`audit_facts`).
    """
    from factedit.audit.report import write_outputs

    shard = shard or Shard()
    out = Path(out)
    fp = model_fingerprint(model)
    adapter = ModelLayout(model)
    cfg = config.resolved(adapter.n_layers)
    digest = hashlib.sha256(dumps_json([dataclasses.astuple(f) for f in facts]).encode()).hexdigest()[:16]
    header = {"format": FORMAT, "model": str(getattr(model, "name_or_path", "")), "model_fingerprint": fp,
              "dataset": dataset_name, "n_facts": len(facts), "facts_digest": digest, "config": cfg.__dict__.copy(),
              "n_layers": adapter.n_layers, "n_heads": adapter.n_heads}
    if shard.main:
        prepare_dir(out, header, overwrite)
    shard.barrier()

    store = FactStore(out, shard.rank, shard.world_size)
    kept = store.records()
    mine = [f for f in facts if f.index % shard.world_size == shard.rank]

    def done(f: AuditFact) -> bool:  # a record of this very fact, well formed: kept; else recomputed
        r = kept.get(f.index)
        return r is not None and belongs(r, f) and well_formed(r, adapter.n_layers, adapter.n_heads)

    todo = [f for f in mine if not done(f)]
    if todo and shard.main:
        log(f"auditing {len(todo)} of {len(facts)} facts ({len(facts) - len(todo) * shard.world_size} done before)"
            if shard.world_size == 1 else f"auditing {len(facts)} facts on {shard.world_size} processes")
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"audit [{shard.rank}]", unit="fact",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for at in range(0, len(todo), batch):
        for rec in audit_facts(todo[at: at + batch], model, tokenizer, cfg, fp, related_of):
            store.append(rec)
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    shard.barrier()
    if not shard.main:
        return None
    chosen = {f.index: f for f in facts}
    records = [r for r in merge(out) if r["index"] in chosen]  # the folder may hold other selections too
    stale = [r["index"] for r in records if not belongs(r, chosen[r["index"]])
             or not well_formed(r, adapter.n_layers, adapter.n_heads)]
    if stale:  # another process's record that does not match: never summarised as this fact
        raise OutputDirError(f"--out {out}: the records of facts {stale[:5]} do not match this dataset: rerun to "
                             "recompute them, or --overwrite to restart")
    return write_outputs(out, records, header, {"facts_this_run": len(todo), "seconds_this_run": round(seconds, 2),
                                                "processes": shard.world_size})


def world_related(world, tok):
    """For a world model: each fact's related tokens are its subject's attributes."""
    cache: dict[str, set[int]] = {}

    def related_of(fact: AuditFact) -> set[int] | None:
        if fact.subject not in cache:
            try:
                cache[fact.subject] = related_tokens(tok, list(world.entity(fact.subject).facts.values()))
            except KeyError:
                return None
        return cache[fact.subject]

    return related_of


def text_related(tok):
    def related_of(fact: AuditFact) -> set[int] | None:
        return related_tokens(tok, fact.related) if fact.related else None

    return related_of
