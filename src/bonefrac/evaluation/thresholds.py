"""Operating-point policies. Thresholds are chosen on VALIDATION data only, never on test.

Policies (strings, as on the command line):
- ``sensitivity:0.95``: the highest specificity whose sensitivity stays >= 0.95 (default;
  a missed fracture is the costlier error).
- ``specificity:0.90``: the highest sensitivity whose specificity stays >= 0.90.
- ``youden``: maximises sensitivity + specificity - 1.
- ``fixed:0.5``: that threshold as given.
"""

from __future__ import annotations

import numpy as np

from bonefrac import InputError
from bonefrac.evaluation.metrics import counts_at

DEFAULT_POLICY = "sensitivity:0.95"


def parse_policy(policy: str) -> tuple[str, float | None]:
    name, _, arg = policy.partition(":")
    name = name.strip().lower()
    if name == "youden" and not arg:
        return name, None
    if name in ("sensitivity", "specificity", "fixed") and arg:
        v = float(arg)
        if not 0.0 <= v <= 1.0:
            raise InputError(f"policy {policy!r}: value must lie in [0, 1]")
        return name, v
    raise InputError(f"unknown threshold policy {policy!r}; use youden, sensitivity:X, "
                     "specificity:X or fixed:X")


def _candidates(p: np.ndarray) -> np.ndarray:
    u = np.unique(p)
    # midpoints between adjacent scores are robust to tiny numeric drift (ONNX vs torch)
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else u
    return np.unique(np.concatenate([mids, [0.0, 1.0 + 1e-9]]))


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, policy: str = DEFAULT_POLICY
                     ) -> tuple[float, str]:
    """Pick a decision threshold on (validation) data; returns (threshold, explanation)."""
    name, v = parse_policy(policy)
    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_prob, dtype=np.float64)
    if name == "fixed":
        return float(v), f"fixed threshold {v}"
    ts = _candidates(p)
    tp, fp, n_pos, n_neg = counts_at(y, p, ts)
    rows = [(t, int(a) / max(1, n_pos), (n_neg - int(b)) / max(1, n_neg))
            for t, a, b in zip(ts, tp, fp, strict=True)]
    if name == "youden":
        t, se, sp = max(rows, key=lambda r: (r[1] + r[2], r[0]))
        return float(t), f"Youden's J maximised (sens {se:.3f} + spec {sp:.3f} - 1)"
    if name == "sensitivity":
        ok = [r for r in rows if r[1] >= v]
        t, se, sp = max(ok, key=lambda r: (r[2], r[0]))
        return float(t), (f"highest specificity ({sp:.3f}) keeping sensitivity >= {v} "
                          f"(achieved {se:.3f})")
    ok = [r for r in rows if r[2] >= v]
    t, se, sp = max(ok, key=lambda r: (r[1], -r[0]))
    return float(t), (f"highest sensitivity ({se:.3f}) keeping specificity >= {v} "
                      f"(achieved {sp:.3f})")
