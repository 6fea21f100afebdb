"""The audit's per-fact records on disk: append-only JSONL that survives kill -9.

One process appends to ``facts.jsonl``; under data parallelism process r of W appends to
``facts.shard<r>-of<W>.jsonl``. A record is one line, written with a single ``write`` and
fsynced, so a kill leaves at worst a torn last line. Reading drops torn or unparsable lines
(rewriting the file atomically without them), so those facts are recomputed. A record that no
longer belongs to its fact (the dataset or the selection changed) is recomputed and appended;
the later record of an index wins. ``merge`` folds the shards into ``facts.jsonl``
(deduplicated by fact index, sorted) with one atomic rename,
and only then removes the shards: killed at any point, nothing is lost or doubled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from factedit.io import atomic_write_text, dumps_json

FACTS = "facts.jsonl"


def shard_name(rank: int, world_size: int) -> str:
    return f"facts.shard{rank}-of{world_size}.jsonl"


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The complete records of a JSONL file. With ``repair``, a file holding a torn or corrupt
    line is rewritten (atomically) without it."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    good, bad = [], 0
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is torn (or empty)
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("index"), int):
            good.append(rec)
        else:
            bad += 1
    torn = not data.endswith(b"\n") and len(data) > 0
    if repair and (bad or torn):
        atomic_write_text(path, "".join(dumps_json(r, sort_keys=True) + "\n" for r in good))
    return good


class FactStore:
    """Where this process appends its records, and what is already done."""

    def __init__(self, out: Path, rank: int = 0, world_size: int = 1):
        self.out = Path(out)
        self.path = self.out / (FACTS if world_size == 1 else shard_name(rank, world_size))

    def done(self) -> set[int]:
        """Indices recorded in ``facts.jsonl`` or in any shard (own file repaired)."""
        return set(self.records())

    def records(self) -> dict[int, dict]:
        """The records in ``facts.jsonl`` and in every shard by index, the latest of each (own
        file repaired). The caller checks that each still belongs to its fact."""
        by_index = {r["index"]: r for r in read_records(self.out / FACTS, repair=self.path.name == FACTS)}
        for shard in sorted(self.out.glob("facts.shard*.jsonl")):
            by_index.update({r["index"]: r for r in read_records(shard, repair=shard == self.path)})
        return by_index

    def append(self, record: dict) -> None:
        line = (dumps_json(record, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # minus the umask
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def merge(out: Path) -> list[dict]:
    """Fold every shard into ``facts.jsonl`` (one record per index, sorted) and return the
    records. Safe to rerun after a kill at any point."""
    out = Path(out)
    shards = sorted(out.glob("facts.shard*.jsonl"))
    by_index: dict[int, dict] = {}
    for path in [out / FACTS, *shards]:  # oldest first: a record recomputed later replaces the stale one
        for rec in read_records(path):
            by_index[rec["index"]] = rec
    records = [by_index[i] for i in sorted(by_index)]
    text = "".join(dumps_json(r, sort_keys=True) + "\n" for r in records)
    if not (out / FACTS).is_file() or (out / FACTS).read_text(encoding="utf-8") != text:
        atomic_write_text(out / FACTS, text)
    for s in shards:
        s.unlink()
    return records
