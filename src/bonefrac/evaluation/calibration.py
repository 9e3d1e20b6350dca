"""Temperature scaling for a 2-way softmax (Guo et al., 2017), numpy only.

With logits ``z`` of shape ``(N, 2)``, P(fractured) = sigmoid((z1 - z0) / T). T is fitted on
validation data by minimising the negative log-likelihood (golden-section search on log T).
"""

from __future__ import annotations

import math

import numpy as np

from bonefrac.evaluation.metrics import log_loss


def calibrated_prob(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``(N, 2)`` logits -> ``(N,)`` P(fractured) after dividing the logits by ``temperature``."""
    d = (np.asarray(logits, np.float64)[:, 1] - np.asarray(logits, np.float64)[:, 0])
    return 1.0 / (1.0 + np.exp(-d / temperature))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, lo: float = 0.05,
                    hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising validation NLL (the NLL is unimodal in log T)."""
    def nll(log_t: float) -> float:
        return log_loss(y_true, calibrated_prob(logits, math.exp(log_t)))

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if nll(c) < nll(d):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return float(math.exp((a + b) / 2))
