"""Matplotlib figures (Agg backend, files only). Each function writes one PNG atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bonefrac import CLASSES
from bonefrac.evaluation.metrics import counts_at, roc_auc, roc_curve


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from bonefrac.utils import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _fig().close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def plot_curve(history: Sequence[Mapping], key: str, path: Path, title: str) -> None:
    """Training and validation ``key`` per epoch across stages (the stage change marked)."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(1, len(history) + 1)
    ax.plot(x, [h[key] for h in history], "o-", label=f"train {key}")
    ax.plot(x, [h[f"val_{key}"] for h in history], "s-", label=f"validation {key}")
    stages = [h["stage"] for h in history]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i + 0.5, color="gray", ls="--", lw=1)
            ax.text(i + 0.6, ax.get_ylim()[1], f" {stages[i]}", va="top", fontsize=8)
    ax.set_xlabel("epoch (frozen backbone, then fine-tuning)")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(counts: Mapping[str, int], path: Path, title: str) -> None:
    plt = _fig()
    m = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(m, cmap="Blues")
    labels = list(CLASSES)
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=14)
    ax.set_title(title)
    _save(fig, path)


def plot_roc(y_true: np.ndarray, probs: Mapping[str, np.ndarray], path: Path, title: str,
             points: Mapping[str, tuple[float, float]] | None = None) -> None:
    """ROC curves of several score sets on one plot; ``points`` marks (fpr, tpr) pairs."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in probs.items():
        fpr, tpr, _ = roc_curve(y_true, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y_true, p):.3f})")
    for name, (fx, ty) in (points or {}).items():
        ax.plot([fx], [ty], "k^")
        ax.annotate(name, (fx, ty), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_reliability(y_true: np.ndarray, probs: Mapping[str, np.ndarray], path: Path,
                     title: str, n_bins: int = 15) -> None:
    plt = _fig()
    fig, ax = plt.subplots(figsize=(5, 5))
    y = np.asarray(y_true, float)
    for name, p in probs.items():
        p = np.asarray(p, float)
        bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            m = bins == b
            if m.any():
                xs.append(p[m].mean())
                ys.append(y[m].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.plot([0, 1], [0, 1], color="gray", ls=":", label="perfect calibration")
    ax.set_xlabel("mean predicted P(fractured)")
    ax.set_ylabel("observed fraction fractured")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_threshold_robustness(y_true: np.ndarray, y_prob: np.ndarray, path: Path, title: str,
                              marks: Mapping[str, float]) -> None:
    """Sensitivity, specificity, PPV and NPV against the threshold, operating points marked."""
    plt = _fig()
    ts = np.linspace(0, 1, 201)
    tp, fp, n_pos, n_neg = counts_at(y_true, y_prob, ts)
    counts = {"tp": tp, "fp": fp, "fn": n_pos - tp, "tn": n_neg - fp}

    def ratio(a, b):
        num, den = counts[a], counts[a] + counts[b]
        return np.array([x / d if d else np.nan for x, d in zip(num, den, strict=True)])

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(ts, ratio("tp", "fn"), label="sensitivity")
    ax.plot(ts, ratio("tn", "fp"), label="specificity")
    ax.plot(ts, ratio("tp", "fp"), label="PPV")
    ax.plot(ts, ratio("tn", "fn"), label="NPV")
    for name, t in marks.items():
        ax.axvline(t, color="k", ls="--", lw=1)
        ax.text(t, 0.02, f" {name}\n t={t:.3f}", fontsize=8)
    ax.set_xlabel("threshold on P(fractured)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower center", ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
