"""The ``comparison.md`` table: baseline vs each member vs ensemble on one split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonefrac.evaluation.metrics import binary_metrics, paired_bootstrap_auc_diff
from bonefrac.inference.ensemble import Ensemble
from bonefrac.utils import write_text


def write_comparison(res: Path, ens: Ensemble, y: np.ndarray, probs: dict[str, np.ndarray],
                     fused: np.ndarray, split: str) -> dict:
    """Each row at its own validation-chosen threshold. Returns the table as a dict."""
    baseline = ens.meta.get("baseline_member") or ens.members[0].name
    rows = {}
    for m in ens.members:
        label = f"{m.name} (baseline)" if m.name == baseline else m.name
        t = 0.5 if m.spec.threshold is None else m.spec.threshold
        rows[label] = binary_metrics(y, probs[m.name], t, n_boot=200)
    rows["ensemble"] = binary_metrics(y, fused, ens.threshold, n_boot=200)
    diff, lo, hi = paired_bootstrap_auc_diff(y, fused, probs[baseline], n_boot=2000, seed=0)
    b = rows[f"{baseline} (baseline)"]["counts"]
    e = rows["ensemble"]["counts"]
    fewer_fn, fewer_fp = e["fn"] < b["fn"], e["fp"] < b["fp"]
    if fewer_fn and fewer_fp:
        verdict = "yes: the ensemble makes fewer false negatives AND fewer false positives"
    else:
        parts = [f"FN {b['fn']} -> {e['fn']}", f"FP {b['fp']} -> {e['fp']}"]
        verdict = ("no, not here: the ensemble does not reduce both error types "
                   f"({', '.join(parts)})")
    lines = [f"# Baseline vs members vs ensemble ({split} split, n={len(y)})", "",
             "Each model at its own threshold, chosen on the validation split by the policy "
             f"`{ens.meta.get('threshold_policy', '?')}`.", "",
             "| model | threshold | AUC | sensitivity | specificity | PPV | NPV | FN | FP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        c = m["counts"]
        lines.append(f"| {name} | {m['threshold']:.3f} | {m['roc_auc']['value']:.4f} | "
                     f"{m['sensitivity']['value']:.3f} | {m['specificity']['value']:.3f} | "
                     f"{m['ppv']['value']:.3f} | {m['npv']['value']:.3f} | {c['fn']} | "
                     f"{c['fp']} |")
    lines += ["", f"AUC difference, ensemble minus baseline: {diff:+.4f} "
              f"(paired stratified bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}], 2000 resamples)"
              + (" - the CI includes 0: no significant difference." if lo <= 0 <= hi else "."),
              "", "Whether the ensemble reduces both error types (false negatives and false "
              f"positives) against the baseline: {verdict}.", ""]
    write_text(res / "comparison.md", "\n".join(lines))
    return {"rows": rows, "auc_diff": {"value": diff, "ci95": [lo, hi]}, "claim": verdict}


def write_model_comparison(res: Path, y: np.ndarray, models: dict[str, dict], split: str,
                           n_boot: int = 2000) -> dict:
    """Append "model A vs model B" on the same images to ``res/comparison.md``.

    ``models``: two entries ``{name: {"prob": (N,), "threshold": t, "localisation": dict|None}}``
    in the order (new, old); each model at its own validation-chosen threshold. The AUC
    difference (new minus old) has a paired stratified bootstrap CI; both error types are
    compared, and the pointing game where both have localisation metrics.
    """
    (new, a), (old, b) = models.items()
    ma = binary_metrics(y, a["prob"], a["threshold"], n_boot=200)
    mb = binary_metrics(y, b["prob"], b["threshold"], n_boot=200)
    diff, lo, hi = paired_bootstrap_auc_diff(y, a["prob"], b["prob"], n_boot=n_boot, seed=0)
    lines = ["", f"## {new} vs {old} ({split} split, the same n={len(y)} images)", "",
             "| model | threshold | AUC [95% CI] | sensitivity | specificity | FN | FP | "
             "pointing game [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for name, m, spec in ((new, ma, a), (old, mb, b)):
        c, loc = m["counts"], (spec.get("localisation") or {}).get("pointing_game")
        pg = f"{loc['value']:.3f} [{loc['ci95'][0]:.3f}, {loc['ci95'][1]:.3f}]" if loc else "-"
        auc = m["roc_auc"]
        lines.append(f"| {name} | {m['threshold']:.3f} | {auc['value']:.4f} "
                     f"[{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}] | "
                     f"{m['sensitivity']['value']:.3f} | {m['specificity']['value']:.3f} | "
                     f"{c['fn']} | {c['fp']} | {pg} |")
    ca, cb = ma["counts"], mb["counts"]
    lines += ["", f"AUC difference, {new} minus {old}: {diff:+.4f} (paired stratified bootstrap "
              f"95% CI [{lo:+.4f}, {hi:+.4f}], {n_boot} resamples)"
              + (" - the CI includes 0." if lo <= 0 <= hi else "."),
              f"Error types, {old} -> {new}: false negatives {cb['fn']} -> {ca['fn']}, "
              f"false positives {cb['fp']} -> {ca['fp']}.", ""]
    path = res / "comparison.md"
    before = path.read_text() if path.is_file() else ""
    write_text(path, before + "\n".join(lines))
    return {"models": [new, old], "auc_diff": {"value": diff, "ci95": [lo, hi]},
            "errors": {new: {"fn": ca["fn"], "fp": ca["fp"]},
                       old: {"fn": cb["fn"], "fp": cb["fp"]}}}
