"""Write the evaluation artifacts (PNG + text + JSON) of one model or ensemble on one split."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bonefrac import CLASSES, DISCLAIMER
from bonefrac.evaluation import plots
from bonefrac.evaluation.metrics import binary_metrics

METRIC_ROWS = [("sensitivity", "Sensitivity (recall, TPR)"),
               ("specificity", "Specificity (TNR)"), ("ppv", "PPV (precision)"), ("npv", "NPV"),
               ("accuracy", "Accuracy"), ("f1", "F1"), ("roc_auc", "ROC-AUC")]


def format_clinical_metrics(m: Mapping, title: str) -> str:
    """Human-readable metrics with 95 % CIs, counts and the disclaimer."""
    c = m["counts"]
    lines = [title, "=" * len(title),
             f"images: {m['n']} ({m['n_positive']} fractured, {m['n_negative']} non-fractured)",
             f"decision threshold on P(fractured): {m['threshold']:.4f}", "",
             f"{'metric':28s} {'value':>7s}   95% CI"]
    for key, label in METRIC_ROWS:
        v = m[key]
        lo, hi = v["ci95"]
        frac = f"  ({v['k']}/{v['n']})" if "k" in v else ""
        lines.append(f"{label:28s} {v['value']:7.4f}   [{lo:.4f}, {hi:.4f}]{frac}")
    lines += ["", f"TP={c['tp']}  FP={c['fp']}  TN={c['tn']}  FN={c['fn']}",
              "CIs: Wilson score for proportions; stratified bootstrap (2000 resamples, "
              "seed 0) for F1 and ROC-AUC.", "", DISCLAIMER, ""]
    return "\n".join(lines)


def classification_report_text(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    from sklearn.metrics import classification_report

    return classification_report(y_true, y_pred, labels=[0, 1],
                                 target_names=list(CLASSES), digits=4,
                                 zero_division=0)


def write_split_results(out: Path, y_true: np.ndarray, y_prob: np.ndarray, threshold: float,
                        threshold_note: str, *, suffix: str = "", title: str = "",
                        roc_probs: Mapping[str, np.ndarray] | None = None) -> dict:
    """Write ``confusion_matrix{suffix}.png``, ``roc_curve{suffix}.png``,
    ``classification_report{suffix}.txt``, ``clinical_metrics{suffix}.txt`` and
    ``threshold_note{suffix}.txt`` into ``out``; return the metrics dict."""
    from bonefrac.utils import write_text

    out.mkdir(parents=True, exist_ok=True)
    m = binary_metrics(y_true, y_prob, threshold)
    plots.plot_confusion(m["counts"], out / f"confusion_matrix{suffix}.png",
                         f"{title}\nthreshold {threshold:.3f}")
    plots.plot_roc(y_true, roc_probs or {title or "model": y_prob}, out / f"roc_curve{suffix}.png",
                   f"ROC - {title}",
                   points={"operating point": (1 - m["specificity"]["value"],
                                               m["sensitivity"]["value"])})
    write_text(out / f"classification_report{suffix}.txt",
               f"{title}\n\n" + classification_report_text(y_true, y_prob >= threshold)
               + f"\n{DISCLAIMER}\n")
    write_text(out / f"clinical_metrics{suffix}.txt", format_clinical_metrics(m, title))
    write_text(out / f"threshold_note{suffix}.txt", threshold_note.rstrip() + "\n")
    return m
