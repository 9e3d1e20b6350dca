"""Temperature scaling for a 2-way softmax (Guo et al., 2017), numpy only.

With logits ``z`` of shape ``(N, 2)``, P(fractured) = sigmoid((z1 - z0) / T). T is fitted on
validation data by minimising the negative log-likelihood (golden-section search on log T).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from bonefrac.evaluation.metrics import log_loss

# Applying T is prediction's job and lives with it; fitting T is this module's.
from bonefrac.inference.calibration import calibrated_prob, fuse

__all__ = ["calibrated_prob", "fit_fused_temperatures", "fit_temperature", "minimise_1d"]


def minimise_1d(f: Callable[[float], float], a: float, b: float, iters: int = 80) -> float:
    """Golden-section search for the minimum of a unimodal ``f`` on [a, b]."""
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(iters):
        if f(c) < f(d):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return (a + b) / 2


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, lo: float = 0.05,
                    hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising validation NLL (the NLL is unimodal in log T)."""
    def nll(log_t: float) -> float:
        return log_loss(y_true, calibrated_prob(logits, math.exp(log_t)))

    return float(math.exp(minimise_1d(nll, math.log(lo), math.log(hi))))


def fit_fused_temperatures(logits: dict[str, np.ndarray], y_true: np.ndarray,
                           weights: dict[str, float], sweeps: int = 3, lo: float = 0.05,
                           hi: float = 20.0) -> dict[str, float]:
    """Per-member temperatures minimising the validation NLL of the FUSED probability.

    Averaging already softens the members, so temperatures fitted one member at a time can
    over-soften the ensemble (measured here: fused validation NLL 0.419 -> 0.426). Coordinate
    descent from T = 1 that keeps only improving steps never ends worse than uncalibrated.
    """
    temps = {n: 1.0 for n in logits}

    def nll(t: dict[str, float]) -> float:
        return log_loss(y_true, fuse({n: calibrated_prob(logits[n], t[n]) for n in logits},
                                     weights))

    best = nll(temps)
    for _ in range(sweeps):
        for n in logits:
            cand = {**temps, n: math.exp(minimise_1d(
                lambda lt, n=n, t=temps: nll({**t, n: math.exp(lt)}), math.log(lo), math.log(hi)))}
            if (v := nll(cand)) < best:
                temps, best = cand, v
    return temps
