"""The verify-predicts study's ROC AUC (studies/verify_predicts.py) against a naive computation:
the area under the ROC curve drawn point by point, one threshold per distinct score, by the
trapezoid rule. The two agree to float rounding (1e-12): the trapezoid over a tied threshold
is exactly the Mann-Whitney count's one half per tie."""

import math
import random

import pytest

from factedit.studies.verify_predicts import roc_auc, signal_aucs


def naive_auc(scores, labels):
    pos = sum(labels)
    neg = len(labels) - pos
    points = [(0.0, 0.0)]
    for t in sorted(set(scores), reverse=True):  # predict success when score >= t
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        fp = sum(1 for s, y in zip(scores, labels) if s >= t and not y)
        points.append((fp / neg, tp / pos))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_the_area_under_the_roc_curve(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 60)
    scores = [rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for _ in range(n)]  # ties on purpose
    labels = [rng.random() < 0.3 + 0.4 * s for s in scores]
    if all(labels) or not any(labels):
        labels[0] = not labels[0]
    a = roc_auc(scores, labels)
    assert math.isclose(a["auc"], naive_auc(scores, labels), abs_tol=1e-12)
    assert a["n_success"] == sum(labels) and a["n_failure"] == n - sum(labels)
    assert 0 <= a["ci"][0] <= a["auc"] <= a["ci"][1] <= 1


def test_auc_extremes_and_undefined():
    assert roc_auc([3, 2, 1, 0], [True, True, False, False])["auc"] == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False])["auc"] == 0.0
    assert roc_auc([1, 1, 1, 1], [True, False, True, False])["auc"] == 0.5
    assert roc_auc([1, 2], [True, True]) is None
    with pytest.raises(ValueError, match="3 scores for 2 labels"):
        roc_auc([1, 2, 3], [True, False])


def test_signal_aucs_skip_unknown_outcomes_and_rank_missing_signals_lowest():
    rows = [{"s": 0.9, "ok": True}, {"s": None, "ok": False}, {"s": 0.1, "ok": None}, {"s": 0.2, "ok": False}]
    got = signal_aucs(rows, "ok", ("s",))["s"]
    assert got["auc"] == 1.0 and got["n_success"] == 1 and got["n_failure"] == 2
