"""Everything fitted on the VALIDATION split: temperatures, fusion weights, thresholds.

Nothing here ever sees test data; callers pass validation labels and logits only.
"""

from __future__ import annotations

import itertools

import numpy as np

from bonefrac import InputError
from bonefrac.evaluation.calibration import (
    calibrated_prob,
    fit_fused_temperatures,
    fit_temperature,
)
from bonefrac.evaluation.metrics import brier_score, expected_calibration_error, log_loss, roc_auc
from bonefrac.evaluation.thresholds import DEFAULT_POLICY, choose_threshold
from bonefrac.inference.calibration import fuse
from bonefrac.inference.operating_points import OperatingPoint, OperatingPoints

# The two named operating points shipped with every model, as in commercial fracture-AI products.
OPERATING_POLICIES = {
    "triage": (DEFAULT_POLICY, "high sensitivity: flag nearly every fracture for review"),
    "confirmation": ("specificity:0.90", "high specificity: few false alarms"),
}


def weight_grid(names: list[str], step: float = 0.05) -> list[dict[str, float]]:
    """All weight vectors on the simplex with the given step (sum exactly 1)."""
    n = round(1 / step)
    out = []
    for combo in itertools.product(range(n + 1), repeat=len(names) - 1):
        if sum(combo) <= n:
            ws = [c / n for c in combo] + [(n - sum(combo)) / n]
            out.append(dict(zip(names, ws, strict=True)))
    return out


def fit_operating_points(y_val: np.ndarray, p_val: np.ndarray, policy: str = DEFAULT_POLICY
                         ) -> tuple[OperatingPoints, str]:
    """The decision rule fitted on VALIDATION labels ``(N,)`` and fused P ``(N,)``: the default
    threshold by ``policy`` and the named points of ``OPERATING_POLICIES``; with how the
    default was chosen."""
    threshold, note = choose_threshold(y_val, p_val, policy)
    points = {}
    for name, (pol, desc) in OPERATING_POLICIES.items():
        t, how = choose_threshold(y_val, p_val, pol)
        points[name] = OperatingPoint(float(t), pol, desc, how)
    return OperatingPoints(float(threshold), points), note


def fit_on_validation(y_val: np.ndarray, logits_val: dict[str, np.ndarray], *,
                      fit_weights: str | None = None, policy: str = DEFAULT_POLICY,
                      calibrate: bool = True) -> dict:
    """Fit calibration, fusion weights and operating points on validation data.

    Args:
        y_val: ``(N,)`` validation labels (1 = fractured).
        logits_val: member name -> ``(N, 2)`` validation logits.
        fit_weights: None for equal weights, or ``"logloss"`` / ``"auc"`` for a grid search
            (step 0.05) on the validation split.
        policy: threshold policy for the default decision threshold.
    Returns: a JSON-ready dict (temperatures, weights, threshold, operating points, and the
        validation calibration report: ECE/Brier/NLL before and after).
    """
    names = list(logits_val)
    temps = {n: fit_temperature(logits_val[n], y_val) if calibrate else 1.0 for n in names}
    raw = {n: calibrated_prob(logits_val[n], 1.0) for n in names}
    cal = {n: calibrated_prob(logits_val[n], temps[n]) for n in names}
    equal = {n: 1.0 / len(names) for n in names}
    if fit_weights and len(names) > 1:
        if fit_weights not in ("logloss", "auc"):
            raise InputError("fit_weights must be 'logloss' or 'auc'")

        def score(w):
            p = fuse(cal, w)
            return log_loss(y_val, p) if fit_weights == "logloss" else -roc_auc(y_val, p)

        weights = min(weight_grid(names), key=score)
        how = f"grid search (step 0.05) minimising validation {fit_weights}"
    else:
        weights, how = equal, "equal weights (default)"
    if len(names) > 1:  # the ensemble's own calibration, not each member's alone
        temps = fit_fused_temperatures(logits_val, y_val, weights) if calibrate else temps
        cal = {n: calibrated_prob(logits_val[n], temps[n]) for n in names}
    fused_raw, fused = fuse(raw, weights), fuse(cal, weights)
    points, note = fit_operating_points(y_val, fused, policy)

    def calib(p):
        return {"ece_15": expected_calibration_error(y_val, p), "brier": brier_score(y_val, p),
                "nll": log_loss(y_val, p)}

    return {
        "temperatures": temps, "weights": weights, "weights_how": how,
        "threshold": points.default, "threshold_policy": policy, "threshold_how": note,
        "operating_points": points.to_meta()["operating_points"],
        "validation": {"n": int(len(y_val)), "n_positive": int(np.sum(y_val)),
                       "auc": roc_auc(y_val, fused),
                       "calibration_before": calib(fused_raw), "calibration_after": calib(fused),
                       "members": {n: {"auc": roc_auc(y_val, cal[n]), "temperature": temps[n],
                                       "before": calib(raw[n]), "after": calib(cal[n])}
                                   for n in names}},
    }
