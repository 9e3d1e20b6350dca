"""Do the 95 % intervals of ``binary_metrics`` cover the truth 95 % of the time?

The one place where simulated data is right: coverage needs a known true value. Proportions use
the Wilson interval; ROC-AUC uses a stratified bootstrap, checked under the binormal model
(negatives ~ N(0, 1), positives ~ N(d, 1)), whose true AUC is Phi(d / sqrt(2)).
Each coverage test also shows it can fail: an interval of the wrong width misses the band.
Then every metric is checked against scikit-learn / SciPy on random inputs.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import binom, binomtest
from sklearn import metrics as skm

from bonefrac.evaluation.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    brier_score,
    confusion_counts,
    expected_calibration_error,
    log_loss,
    roc_auc,
    wilson_ci,
)


def _band(n_sims: int, level: float = 0.95) -> tuple[float, float]:
    """Nominal coverage +- 3 Monte-Carlo standard errors of a coverage estimated from n_sims."""
    se = math.sqrt(level * (1 - level) / n_sims)
    return level - 3 * se, level + 3 * se


def _shrunk(lo: float, hi: float, factor: float = 0.5) -> tuple[float, float]:
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * factor
    return mid - half, mid + half


@pytest.mark.parametrize(("p_true", "n"), [(0.3, 40), (0.85, 120)])
def test_wilson_covers_true_proportion(p_true, n):
    n_sims = 400
    rng = np.random.default_rng(12345)
    ks = rng.binomial(n, p_true, n_sims)
    hits = [lo <= p_true <= hi for lo, hi in (wilson_ci(int(k), n) for k in ks)]
    narrow = [lo <= p_true <= hi for lo, hi in (_shrunk(*wilson_ci(int(k), n)) for k in ks)]
    lo_b, hi_b = _band(n_sims)
    assert lo_b <= np.mean(hits) <= hi_b, f"Wilson coverage {np.mean(hits):.3f}"
    # the criterion is able to fail: a half-width interval covers far too rarely
    assert np.mean(narrow) < lo_b


def test_wilson_exact_coverage_over_p():
    """Exact (binomial-sum) coverage averaged over p in [0.1, 0.9] is close to 95 % for n=50,
    and no p falls below 90 % (Wilson's known, mild oscillation)."""
    n = 50
    ks = np.arange(n + 1)
    cis = np.array([wilson_ci(int(k), n) for k in ks])
    cover = []
    for p in np.linspace(0.1, 0.9, 161):
        inside = (cis[:, 0] <= p) & (p <= cis[:, 1])
        cover.append(binom.pmf(ks, n, p)[inside].sum())
    assert 0.94 <= np.mean(cover) <= 0.96
    assert min(cover) >= 0.90


def test_wilson_matches_scipy():
    for k, n in [(0, 10), (1, 10), (7, 20), (20, 20), (341, 2060), (55, 61)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_ci(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))


@pytest.mark.slow  # 2,000-resample bootstraps, repeated: ~8 s
def test_bootstrap_auc_covers_true_auc():
    """Binormal scores with true AUC 0.8, 40 + 40 cases; 300 simulations x 300 resamples."""
    auc_true, n_per_class, n_sims = 0.8, 40, 300
    d = math.sqrt(2) * NormalDist().inv_cdf(auc_true)
    rng = np.random.default_rng(2024)
    y = np.r_[np.zeros(n_per_class), np.ones(n_per_class)].astype(int)
    hits, narrow = [], []
    for sim in range(n_sims):
        score = np.r_[rng.normal(0, 1, n_per_class), rng.normal(d, 1, n_per_class)]
        prob = 1 / (1 + np.exp(-score))  # any monotone map: the AUC is rank-based
        lo, hi = bootstrap_auc_ci(y, prob, n_boot=300, seed=sim)
        hits.append(lo <= auc_true <= hi)
        slo, shi = _shrunk(lo, hi)
        narrow.append(slo <= auc_true <= shi)
    lo_b, hi_b = _band(n_sims)
    assert lo_b <= np.mean(hits) <= hi_b, f"bootstrap AUC coverage {np.mean(hits):.3f}"
    assert np.mean(narrow) < lo_b


@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(15, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1).round(2)  # rounding creates ties
    t = float(rng.uniform(0.1, 0.9))
    pred = (p >= t).astype(int)
    m = binary_metrics(y, p, t, n_boot=50, seed=seed)

    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m["counts"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert confusion_counts(y, pred) == m["counts"]
    kw = {"zero_division": np.nan}
    expected = {
        "sensitivity": skm.recall_score(y, pred, pos_label=1, **kw),
        "specificity": skm.recall_score(y, pred, pos_label=0, **kw),
        "ppv": skm.precision_score(y, pred, pos_label=1, **kw),
        "npv": skm.precision_score(y, pred, pos_label=0, **kw),
        "accuracy": skm.accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred, **kw),
        "roc_auc": skm.roc_auc_score(y, p),
    }
    for key, ref in expected.items():
        got = m[key]["value"]
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-12), key
        lo, hi = m[key]["ci95"]
        if not math.isnan(got):
            assert lo - 1e-12 <= got <= hi + 1e-12, f"{key}: {got} outside its CI {lo, hi}"
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        assert m[key]["ci95"] == list(wilson_ci(m[key]["k"], m[key]["n"]))
    assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    assert log_loss(y, p) == pytest.approx(skm.log_loss(y, np.clip(p, 1e-12, 1 - 1e-12)),
                                           rel=1e-9)


def test_ece_against_direct_definition():
    rng = np.random.default_rng(7)
    p = rng.uniform(0, 1, 500)
    y = (rng.uniform(0, 1, 500) < p**1.5).astype(int)  # miscalibrated on purpose
    edges = np.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    assert expected_calibration_error(y, p, 15) == pytest.approx(ece, abs=1e-12)
    assert expected_calibration_error(y, p**1.5, 15) < ece  # the true probabilities do better
