"""Binary classification metrics as pure numpy functions (no torch, no sklearn needed).

Conventions: ``y_true`` is ``(N,)`` of {0, 1} with 1 = fractured (positive); ``y_prob`` is
``(N,)`` float P(fractured) in [0, 1]; a case is called positive when ``y_prob >= threshold``.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """TP/FP/TN/FN counts of binary predictions ``(N,)``."""
    y, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return {"tp": int((y & p).sum()), "fp": int((~y & p).sum()),
            "tn": int((~y & ~p).sum()), "fn": int((y & ~p).sum())}


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def binary_clf_curve(y_true: np.ndarray, y_prob: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one counting kernel behind ROC, AUC, threshold choice and the threshold plots.

    As scikit-learn's ``_binary_clf_curve``: the distinct scores, descending, and for each the
    number of negatives (``fps``) and positives (``tps``) scored at or above it, i.e. called
    positive by the rule ``y_prob >= threshold``. Returns ``(fps, tps, thresholds)``, int64,
    int64 and float64 arrays of equal length (empty for empty input).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_prob, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.zeros(0, int)
    tps = np.cumsum(y, dtype=np.int64)[last] if len(s) else np.zeros(0, np.int64)
    fps = (last + 1).astype(np.int64) - tps
    return fps, tps, s[last]


def counts_at(y_true: np.ndarray, y_prob: np.ndarray, thresholds: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(tp, fp, n_pos, n_neg)`` at each of ``thresholds`` (rule ``y_prob >= t``), read off
    :func:`binary_clf_curve`: exactly the counts of ``confusion_counts(y, y_prob >= t)``."""
    fps, tps, thr = binary_clf_curve(y_true, y_prob)
    n_pos = int(tps[-1]) if len(tps) else 0
    n_neg = int(fps[-1]) if len(fps) else 0
    t = np.asarray(thresholds, dtype=np.float64)
    # k = how many distinct scores are >= t (thr is descending, so search its reverse)
    k = len(thr) - np.searchsorted(thr[::-1], t, side="left")
    tp = np.where(k > 0, np.r_[0, tps][k], 0)
    fp = np.where(k > 0, np.r_[0, fps][k], 0)
    return tp, fp, n_pos, n_neg


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), from :func:`binary_clf_curve`.

    The trapezoid sum is accumulated in integers (twice the Mann-Whitney U) and divided once,
    so the value is exactly the Mann-Whitney U / (n_pos * n_neg), correctly rounded.
    """
    fps, tps, _ = binary_clf_curve(y_true, y_prob)
    if len(tps) == 0:
        return math.nan
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        return math.nan
    tp = np.r_[0, tps]
    two_u = int(np.sum(np.diff(np.r_[0, fps]) * (tp[1:] + tp[:-1])))
    return float(two_u / (2 * n_pos * n_neg))


def roc_curve(y_true: np.ndarray, y_prob: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending, starting at +inf (nothing called positive)."""
    fps, tps, thr = binary_clf_curve(y_true, y_prob)
    y = np.asarray(y_true).astype(bool)
    tpr = np.concatenate([[0.0], tps / max(1, y.sum())])
    fpr = np.concatenate([[0.0], fps / max(1, (~y).sum())])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def bootstrap_auc_ci(y_true: np.ndarray, y_prob: np.ndarray, n_boot: int = 2000,
                     seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Stratified bootstrap percentile CI of the ROC-AUC (positives and negatives resampled
    separately, so every resample has both classes)."""
    return _bootstrap(y_true, [y_prob], lambda y, ps: roc_auc(y, ps[0]), n_boot, seed, alpha)


def paired_bootstrap_auc_diff(y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray,
                              n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
                              ) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) with a paired, stratified bootstrap CI: (diff, lo, hi)."""
    lo, hi = _bootstrap(y_true, [prob_a, prob_b],
                        lambda y, ps: roc_auc(y, ps[0]) - roc_auc(y, ps[1]), n_boot, seed, alpha)
    return roc_auc(y_true, prob_a) - roc_auc(y_true, prob_b), lo, hi


def _bootstrap(y_true, probs, stat, n_boot, seed, alpha) -> tuple[float, float]:
    y = np.asarray(y_true).astype(int)
    probs = [np.asarray(p, dtype=np.float64) for p in probs]
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    if len(pos) == 0 or len(neg) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals[b] = stat(y[idx], [p[idx] for p in probs])
    return (float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2)))


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared error of P(fractured) against the 0/1 label."""
    return float(np.mean((np.asarray(y_prob, float) - np.asarray(y_true, float)) ** 2))


def log_loss(y_true: np.ndarray, y_prob: np.ndarray, eps: float = 1e-12) -> float:
    p = np.clip(np.asarray(y_prob, float), eps, 1 - eps)
    y = np.asarray(y_true, float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15
                               ) -> float:
    """ECE of P(fractured) over ``n_bins`` equal-width bins: sum_b |acc_b - conf_b| * n_b / N."""
    y, p = np.asarray(y_true, float), np.asarray(y_prob, float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += abs(y[m].mean() - p[m].mean()) * m.sum() / len(p)
    return float(ece)


def binary_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float, *,
                   n_boot: int = 2000, seed: int = 0) -> dict:
    """Clinical metrics at ``threshold``, each with a 95 % CI.

    Proportions (sensitivity, specificity, PPV, NPV, accuracy) carry Wilson intervals; F1 and
    ROC-AUC carry stratified-bootstrap percentile intervals (``n_boot`` resamples, ``seed``).
    Returns a JSON-ready dict: ``{"sensitivity": {"value", "ci95", "k", "n"}, ..., counts}``.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_prob, dtype=np.float64)
    c = confusion_counts(y, p >= threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]

    def prop(k: int, n: int) -> dict:
        return {"value": k / n if n else math.nan, "ci95": list(wilson_ci(k, n)), "k": k, "n": n}

    def f1_of(yy, pp):
        cc = confusion_counts(yy, pp[0] >= threshold)
        d = 2 * cc["tp"] + cc["fp"] + cc["fn"]
        return 2 * cc["tp"] / d if d else math.nan

    f1 = f1_of(y, [p])
    out = {
        "threshold": float(threshold),
        "n": len(y), "n_positive": int(y.sum()), "n_negative": int(len(y) - y.sum()),
        "sensitivity": prop(tp, tp + fn),
        "specificity": prop(tn, tn + fp),
        "ppv": prop(tp, tp + fp),
        "npv": prop(tn, tn + fn),
        "accuracy": prop(tp + tn, len(y)),
        "f1": {"value": f1, "ci95": list(_bootstrap(y, [p], f1_of, n_boot, seed, 0.05))},
        "roc_auc": {"value": roc_auc(y, p), "ci95": list(bootstrap_auc_ci(y, p, n_boot, seed))},
        "counts": c,
    }
    return out
