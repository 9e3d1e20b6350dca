"""Metric functions against scikit-learn on random inputs, and threshold policies."""

import numpy as np
import pytest
from sklearn import metrics as skm

from bonefrac.evaluation.metrics import (
    binary_metrics,
    brier_score,
    confusion_counts,
    roc_auc,
    roc_curve,
    wilson_ci,
)
from bonefrac.evaluation.thresholds import choose_threshold, parse_policy


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1).round(2)  # rounding creates ties
    assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, p)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    assert brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p))
    t = float(rng.uniform(0.2, 0.8))
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert confusion_counts(y, pred) == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    m = binary_metrics(y, p, t, n_boot=50)
    assert m["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"]["value"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["ppv"]["value"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert m["npv"]["value"] == pytest.approx(skm.precision_score(1 - y, 1 - pred,
                                                                  zero_division=0))
    assert m["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1"]["value"] == pytest.approx(skm.f1_score(y, pred))
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "roc_auc"):
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi


def test_wilson_known_value():
    # Wilson interval for 81/263 (Newcombe 1998, example): 0.2553 to 0.3662
    lo, hi = wilson_ci(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == pytest.approx(1.0)


def test_threshold_policies_on_validation_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    t, note = choose_threshold(y, p, "sensitivity:0.95")
    sens = ((p >= t) & (y == 1)).sum() / (y == 1).sum()
    assert sens >= 0.95 and "0.95" in note
    # no higher threshold keeps sensitivity >= 0.95 with better specificity
    t2, _ = choose_threshold(y, p, "specificity:0.90")
    spec = ((p < t2) & (y == 0)).sum() / (y == 0).sum()
    assert spec >= 0.90
    ty, _ = choose_threshold(y, p, "youden")
    j = [((p >= c) & (y == 1)).mean() / y.mean() + ((p < c) & (y == 0)).mean() / (1 - y.mean())
         for c in np.linspace(0, 1, 101)]
    jy = ((p >= ty) & (y == 1)).mean() / y.mean() + ((p < ty) & (y == 0)).mean() / (1 - y.mean())
    assert jy >= max(j) - 1e-9
    assert choose_threshold(y, p, "fixed:0.5")[0] == 0.5
    for bad in ("sensitivity", "fixed:2", "magic"):
        with pytest.raises(ValueError):
            parse_policy(bad)


@pytest.mark.parametrize("seed", range(5))
def test_counting_kernel_matches_brute_force(seed):
    """binary_clf_curve and counts_at against counting ``p >= t`` per threshold, with ties."""
    from bonefrac.evaluation.metrics import binary_clf_curve, counts_at

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    y = rng.integers(0, 2, n)
    p = rng.random(n).round(int(rng.integers(1, 3)))  # few decimals: many ties
    fps, tps, thr = binary_clf_curve(y, p)
    assert np.array_equal(thr, np.unique(p)[::-1])
    assert np.array_equal(tps, [((p >= t) & (y == 1)).sum() for t in thr])
    assert np.array_equal(fps, [((p >= t) & (y == 0)).sum() for t in thr])
    ts = np.concatenate([np.linspace(-0.1, 1.1, 57), p[:10]])
    tp, fp, n_pos, n_neg = counts_at(y, p, ts)
    assert (n_pos, n_neg) == (int(y.sum()), int((y == 0).sum()))
    for t, a, b in zip(ts, tp, fp, strict=True):
        c = confusion_counts(y, p >= t)
        assert (c["tp"], c["fp"]) == (a, b)
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    if 0 < y.sum() < n:  # sklearn's curve is its _binary_clf_curve normalised
        assert np.allclose(fpr[1:], fps / n_neg) and np.allclose(tpr[1:], tps / n_pos)
