"""Evaluation: pure metric functions, threshold policies, calibration, plots and artifacts."""

from bonefrac.evaluation.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    brier_score,
    confusion_counts,
    expected_calibration_error,
    roc_auc,
    roc_curve,
    wilson_ci,
)
from bonefrac.evaluation.thresholds import choose_threshold, parse_policy

__all__ = ["binary_metrics", "bootstrap_auc_ci", "brier_score", "choose_threshold",
           "confusion_counts", "expected_calibration_error", "parse_policy", "roc_auc",
           "roc_curve", "wilson_ci"]
