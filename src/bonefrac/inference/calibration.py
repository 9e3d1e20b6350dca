"""Calibrated fusion, the part of calibration that prediction needs (numpy only, no torch).

P(fractured) of one member = sigmoid((z1 - z0) / T) for logits ``z`` of shape ``(N, 2)``; the
ensemble's P is the weighted mean of its members' calibrated P. Fitting T and the weights
happens in :mod:`bonefrac.evaluation`, which imports these two functions from here, so the
arrow points one way: evaluation -> inference.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bonefrac import InputError


def calibrated_prob(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``(N, 2)`` logits -> ``(N,)`` P(fractured) after dividing the logits by ``temperature``."""
    d = (np.asarray(logits, np.float64)[:, 1] - np.asarray(logits, np.float64)[:, 0])
    return 1.0 / (1.0 + np.exp(-d / temperature))


def fuse(member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of members' P(fractured): ``(N,)``. Weights must be >= 0 and sum to 1."""
    w = np.array([weights[k] for k in member_probs], dtype=np.float64)
    if (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
        raise InputError(f"fusion weights must be >= 0 and sum to 1, got {dict(weights)}")
    return sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, member_probs.values(),
                                                               strict=True))
