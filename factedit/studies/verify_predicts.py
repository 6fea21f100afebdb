"""Does verify's flow verdict predict that an edit generalises? The measures of
``benchmarks/verify_predicts.py``.

For each edit, verify is run on the edit prompt alone (no paraphrases, no neighbours: what a
user has before any held-out prompt exists), and its flow signals are kept (:func:`flow_signals`):

- ``subject_share``: the share of the edit's gain in p(new) that blocking the subject's
  edges into the last position takes away, in the window where the base model reads the
  subject (check (c); 1 - ``c_gain_surviving_knockout``). High: the new attribute is read from
  the subject, as the paper's extraction mechanism would; low: it is written at the last
  position, where it would not follow the subject into other contexts.
- ``verdict_pass``: verify's verdict on the edit prompt (checks (a) and (c), efficacy).
- ``p_new``: p(new target) on the edit prompt after the edit, a signal without the flow, to
  compare the flow signal against.

The held-out outcomes are what the edit did to prompts verify never saw: its paraphrases'
top-1 (all of them the new target) and its portability probes (each ported or not). How well
a signal ranks successes above failures is the ROC AUC (:func:`roc_auc`): the probability that
a random success scores above a random failure (ties count one half), with the Hanley and
McNeil (1982) 95% interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from factedit.studies.edit_metrics import Z95


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> dict[str, Any] | None:
    """The ROC AUC of ``scores`` for ``labels`` (True: success), by the Mann-Whitney count over
    every (success, failure) pair, ties one half; with the Hanley-McNeil 95% interval (clipped
    to [0, 1]) and the counts. None when either class is empty (the AUC is undefined)."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = sorted(s for s, y in zip(scores, labels) if y)
    neg = sorted(s for s, y in zip(scores, labels) if not y)
    n1, n0 = len(pos), len(neg)
    if not n1 or not n0:
        return None
    # sum over successes of (#failures below) + 1/2 (#failures equal), by merging the sorted lists
    wins, lo, hi = 0.0, 0, 0
    for s in pos:
        while lo < n0 and neg[lo] < s:
            lo += 1
        hi = max(hi, lo)
        while hi < n0 and neg[hi] <= s:
            hi += 1
        wins += lo + 0.5 * (hi - lo)
    auc = wins / (n1 * n0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    half = Z95 * math.sqrt(max(var, 0.0))
    return {"auc": auc, "ci": [max(0.0, auc - half), min(1.0, auc + half)], "n_success": n1, "n_failure": n0,
            "interval": "hanley-mcneil"}


def flow_signals(report: Any) -> dict[str, Any]:
    """The signals verify computes on the edit prompt (an :class:`~factedit.verify.checks.EditReport`)."""
    flow, m = report.flow, report.metrics
    survives = flow.get("c_gain_surviving_knockout")
    return {"verdict": report.verdict, "verdict_pass": report.verdict == "pass",
            "subject_share": None if survives is None else 1.0 - survives,
            "a_ok": flow.get("a_ok"), "in_targeted_components": flow["b_extraction"]["in_targeted_components"],
            "p_new": math.exp(-m["nll_new"]) if m.get("nll_new") is not None else None,
            "reasons": report.reasons}


def signal_aucs(rows: Sequence[dict[str, Any]], outcome: str,
                signals: Sequence[str] = ("subject_share", "verdict_pass", "p_new")) -> dict[str, Any]:
    """Each signal's AUC for ``outcome`` (a per-row bool; rows where it is None are left out);
    a row without the signal (e.g. check (c) not run) scores lowest (-inf)."""
    use = [r for r in rows if r.get(outcome) is not None]
    out: dict[str, Any] = {}
    for s in signals:
        vals = [-math.inf if r.get(s) is None else float(r[s]) for r in use]
        out[s] = roc_auc(vals, [bool(r[outcome]) for r in use])
    return out
