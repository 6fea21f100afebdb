"""Whether two audits agree: the same records up to float32 rounding.

An audit shares each batch's clean forward passes between the facts of one prompt length.
Whether a fact's numbers then come out bit for bit as when the fact runs alone depends on the
CPU's kernels: the BLAS library and ATen pick their code path (and so the order in which a sum
is accumulated) by the matrix shapes and the instruction set (AVX2, AVX-512). So an audit that
was resumed, extended to a larger ``--limit``, or split over processes is promised to agree
with an uninterrupted one *within* :data:`PERCENT_ATOL` / :data:`VALUE_ATOL`, not byte for byte:

- every discrete field is equal: status, prediction, spans, ranks, which heads and MLPs were
  found (a score within the tolerance of its threshold could in principle flip one; not seen);
- a value in percent (knockout curves, sublayer knockout, enrichment-MLP drops, and their
  aggregates) differs by at most ``PERCENT_ATOL`` percentage points;
- any other number (probabilities, head scores, attribute rates, shares) by at most
  ``VALUE_ATOL``.

Measured on the demo model's 60-fact world audit, one thread, on an AMD EPYC with AVX-512: ATen's
scalar, AVX2 and AVX-512 kernels differ from each other by at most 1.9e-4 percentage points and
2e-6 elsewhere (the records keep six decimals), every discrete field equal; within one kernel
family, batched and one-fact-at-a-time runs were bit-identical on that CPU (an Intel Xeon with
AVX-512 was seen to differ in a last digit there). The tolerances leave a 5x margin.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PERCENT_ATOL = 1e-3  # percentage points
VALUE_ATOL = 1e-5
PERCENT_KEYS = ("knockout", "sublayer_knockout", "enrichment")  # a path through one of these holds percents
IGNORED_KEYS = ("run",)  # summary.json's timing of this run (seconds, facts computed, processes)


def _tolerance(path: tuple[str, ...]) -> float:
    return PERCENT_ATOL if any(k.startswith(PERCENT_KEYS) for k in path) else VALUE_ATOL


def differences(a, b, path: tuple[str, ...] = (), limit: int = 20) -> list[str]:
    """Where ``a`` and ``b`` (parsed JSON) disagree beyond the tolerances, as ``path: a vs b``
    lines (at most ``limit``). Integers, strings, booleans and structure must be equal."""
    out: list[str] = []
    _walk(a, b, path, out, limit)
    return out


def _walk(a, b, path: tuple[str, ...], out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    where = ".".join(path) or "<root>"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys {sorted(set(a) ^ set(b))} in only one")
            return
        for k in sorted(a):
            if k not in IGNORED_KEYS or path:
                _walk(a[k], b[k], (*path, str(k)), out, limit)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} items")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _walk(x, y, (*path, str(i)), out, limit)
    elif _is_float(a) and _is_float(b) and (isinstance(a, float) or isinstance(b, float)):
        if not (math.isclose(a, b, rel_tol=0.0, abs_tol=_tolerance(path)) or (math.isnan(a) and math.isnan(b))):
            out.append(f"{where}: {a!r} vs {b!r} (tolerance {_tolerance(path):g})")
    elif type(a) is not type(b) or a != b:
        out.append(f"{where}: {a!r} vs {b!r}")


def _is_float(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def audit_differences(dir_a: str | Path, dir_b: str | Path, limit: int = 20) -> list[str]:
    """:func:`differences` between two audit folders' ``facts.jsonl`` and ``summary.json``
    (the summary's ``run`` block, this run's timing, left out)."""
    a, b = Path(dir_a), Path(dir_b)
    out = differences(_jsonl(a / "facts.jsonl"), _jsonl(b / "facts.jsonl"), ("facts",), limit)
    sa, sb = (b_ / "summary.json" for b_ in (a, b))
    if sa.is_file() or sb.is_file():
        out += differences(json.loads(sa.read_text()), json.loads(sb.read_text()), (), limit - len(out))
    return out
