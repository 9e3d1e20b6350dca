"""``bonefrac site-check``: how a model meets a new site's UNLABELLED images, before anyone labels.

Every image of the site folder is predicted with the input-domain gate on. Reported: how many
images the gate flags and why (each cheap check, and the learned check ``domain_score > 1``),
the domain-score and P(fractured) distributions beside the reference's, the predicted
prevalence (mean calibrated P, and the share called fractured at the model's threshold), and
the advice the numbers imply (:func:`advice`): use as is, recalibrate, adapt, or out of scope.

The reference is ``reference`` (any folder of images, e.g. the model's own validation images)
when given, else what the model folder holds: the P of its evaluation
(``Results/predictions.json``, the test split of its training data) and its gate's share
flagged on validation (about 1% by construction: each limit is a validation 99.5th percentile).
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bonefrac import DISCLAIMER
from bonefrac.evaluation.html_report import CSS, html_table
from bonefrac.inference.domain import OUTSIDE
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.predict import list_inputs, predict_files

QUANTILES = (5, 25, 50, 75, 95)
# Advice thresholds (shares of readable images). The shipped v2's gate flags 1.1-1.2% of the
# canonical validation / test images; far above that the site differs from the training data.
NEAR_REFERENCE = 0.05  # learned-check share up to which the site looks like the training data
RECALIBRATE_UP_TO = 0.25  # beyond this share, new weights (adapt), not only a new threshold
OUT_OF_SCOPE = 0.5  # share failing cheap checks (not plain grey radiographs) or unreadable
P_SHIFT = 0.2  # Kolmogorov-Smirnov distance of P from the reference that calls for a refit


def reason_kind(note: str) -> str:
    """A warning note without its numbers: the kind of check that flagged the image."""
    if note.startswith(OUTSIDE):
        return "learned check: domain_score > 1 (features unlike the training images)"
    head = note.split(" (")[0]
    return re.sub(r"\d+(\.\d+)?(x\d+)?", "#", head).strip()


def _quantiles(x: np.ndarray) -> dict[str, float] | None:
    return ({f"p{q}": round(float(np.percentile(x, q)), 4) for q in QUANTILES}
            if x.size else None)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    if not a.size or not b.size:
        return None
    grid = np.concatenate([a, b])
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return round(float(np.abs(fa - fb).max()), 4)


def reference_from_model(ens: Ensemble) -> dict:
    """P of the model's own evaluation and its gate's validation share flagged, where stored."""
    preds = ens.root / "Results" / "predictions.json"
    prob = (np.array([r["prob"] for r in json.loads(preds.read_text())], float)
            if preds.is_file() else np.array([]))
    gate = ens.meta.get("domain_gate") or {}
    share = float(gate["val_flagged"]) if "val_flagged" in gate else None
    return {"source": f"{ens.root.name}: Results/predictions.json (its evaluation) and its "
                      "gate's validation share", "n": int(prob.size), "prob": prob,
            "domain_score": np.array([]), "learned_share": share}


def reference_from_folder(ens: Ensemble, folder: Path, progress: bool) -> dict:
    """P and domain scores of every image in ``folder``."""
    rows = _predict(ens, folder, progress)[0]
    d = _scores(rows)
    return {"source": str(folder), "n": len(rows), "prob": _probs(rows), "domain_score": d,
            "learned_share": float(np.mean(d > 1)) if d.size else None}


def _predict(ens: Ensemble, folder: Path, progress: bool) -> tuple[list[dict], list[dict]]:
    files, missing = list_inputs([folder])
    res = predict_files(ens, files, progress=progress)
    return res.rows, missing + res.errors


def _probs(rows: Sequence[dict]) -> np.ndarray:
    return np.array([r["prob_fractured"] for r in rows], float)


def _scores(rows: Sequence[dict]) -> np.ndarray:
    return np.array([r["domain_score"] for r in rows if r["domain_score"] is not None], float)


def check_site(model: str | Path, site: str | Path, *, reference: str | Path | None = None,
               progress: bool = True) -> dict:
    """Predict every image under ``site`` with ``model`` (an ensemble folder) and summarise.

    Returns a JSON-ready dict: ``n_images``, ``unreadable`` (file, reason), ``flagged``
    (count, share, ``reasons`` {kind: count}, ``files`` [(file, warning)]), ``prob`` and
    ``domain_score`` (site and reference quantiles, KS distance), ``prevalence`` and
    ``advice`` ({"verdict", "why", "next"}).
    """
    ens = Ensemble.load(model)
    rows, errors = _predict(ens, Path(site), progress)
    ref = (reference_from_folder(ens, Path(reference), progress) if reference
           else reference_from_model(ens))
    return summarise(ens, str(site), rows, errors, ref)


def summarise(ens: Ensemble, site: str, rows: list[dict], errors: list[dict], ref: dict) -> dict:
    """The site check's numbers from prediction rows (see :func:`check_site`)."""
    n = len(rows)
    notes = [[x for x in r["warning"].split("; ") if x] for r in rows]
    kinds = Counter(reason_kind(x) for ns in notes for x in ns)
    learned = sum(any(x.startswith(OUTSIDE) for x in ns) for ns in notes)
    cheap = sum(any(not x.startswith(OUTSIDE) for x in ns) for ns in notes)
    p, d = _probs(rows), _scores(rows)
    out = {
        "site": site, "model_id": ens.model_id, "n_images": n + len(errors),
        "n_predicted": n, "unreadable": errors,
        "flagged": {"n": sum(bool(ns) for ns in notes), "learned": learned, "cheap": cheap,
                    "share": _share(sum(bool(ns) for ns in notes), n),
                    "learned_share": _share(learned, n), "cheap_share": _share(cheap, n),
                    "reasons": dict(kinds.most_common()),
                    "files": [(r["file"], r["warning"]) for r in rows if r["warning"]]},
        "reference": {"source": ref["source"], "n": ref["n"],
                      "learned_share": ref["learned_share"]},
        "prob": {"site": _quantiles(p), "reference": _quantiles(ref["prob"]),
                 "ks_distance": ks_distance(p, ref["prob"])},
        "domain_score": {"site": _quantiles(d), "reference": _quantiles(ref["domain_score"]),
                         "above_1": _share(int(np.sum(d > 1)), d.size)},
        "prevalence": {"mean_p": round(float(p.mean()), 4) if n else None,
                       "called_fractured": _share(int(np.sum(p >= ens.threshold)), n),
                       "threshold": round(float(ens.threshold), 4),
                       "reference_mean_p": (round(float(ref["prob"].mean()), 4)
                                            if ref["prob"].size else None)}}
    out["advice"] = advice(out, gate=bool(d.size))
    out["_hist"] = {"prob": (p, ref["prob"]), "domain_score": (d, ref["domain_score"])}
    return out


def _share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def advice(s: dict, gate: bool = True) -> dict:
    """Use as is / recalibrate / adapt / out of scope, from the shares and the P shift."""
    f, n_all = s["flagged"], s["n_images"]
    bad = (f["cheap"] + len(s["unreadable"])) / n_all if n_all else 1.0
    learned, ks = f["learned_share"] or 0.0, s["prob"]["ks_distance"]
    if bad > OUT_OF_SCOPE:
        return {"verdict": "out of scope", "why": f"{bad:.0%} of the files are unreadable or "
                "fail a cheap check (not plain grey radiographs of the kind trained on)",
                "next": "do not use this model here; check what the files are"}
    if not gate:
        return {"verdict": "unknown", "why": "the model has no learned domain gate",
                "next": "label >= 100 site images and measure (`bonefrac evaluate`)"}
    shift = ks is not None and ks > P_SHIFT
    if learned <= NEAR_REFERENCE and not shift:
        return {"verdict": "use as is, after a check", "why": f"the gate flags {learned:.1%} "
                "(the reference's share is about 1%) and P is distributed like the reference's",
                "next": "measure on >= 100 labelled site images before use"}
    if learned <= RECALIBRATE_UP_TO:
        why = f"the gate flags {learned:.1%}" + (f"; P's distribution moved (KS {ks:.2f})"
                                                   if shift else "")
        return {"verdict": "recalibrate", "why": why,
                "next": "label >= 100 site images (>= 30 per class) and run `bonefrac adapt "
                        "--recalibrate-only`; fine-tune only if that is not enough"}
    return {"verdict": "adapt", "why": f"the gate flags {learned:.1%} of the images: many lie "
            "outside the training distribution, and recalibration does not change how the "
            "model ranks them",
            "next": "label ~300 site images and run `bonefrac adapt` (fine-tune), then "
                    "compare with the parent on held-out site images"}


def render_text(s: dict) -> str:
    """The check as plain text for the terminal."""
    f, pr, a = s["flagged"], s["prevalence"], s["advice"]
    lines = [f"site check: {s['site']} with {s['model_id']}",
             f"  {s['n_images']} file(s): {s['n_predicted']} predicted, "
             f"{len(s['unreadable'])} unreadable",
             f"  flagged by the gate: {f['n']} ({_pct(f['share'])}); learned check "
             f"{f['learned']} ({_pct(f['learned_share'])}, reference "
             f"{_pct(s['reference']['learned_share'])}), cheap checks {f['cheap']}"]
    lines += [f"    {k}: {v}" for k, v in f["reasons"].items()]
    for key, label in (("prob", "P(fractured)"), ("domain_score", "domain_score")):
        for who in ("site", "reference"):
            q = s[key][who]
            if q:
                lines.append(f"  {label} {who}: " + "  ".join(f"{k} {v:.3f}"
                                                               for k, v in q.items()))
    if s["prob"]["ks_distance"] is not None:
        lines.append(f"  P shift from the reference (KS distance): {s['prob']['ks_distance']}")
    lines.append(f"  predicted prevalence: mean P {pr['mean_p']}, called fractured at "
                 f"{pr['threshold']}: {_pct(pr['called_fractured'])} (reference mean P "
                 f"{pr['reference_mean_p']})")
    lines.append(f"  reference: {s['reference']['source']} ({s['reference']['n']} images)")
    lines += [f"advice: {a['verdict'].upper()}: {a['why']}", f"  next: {a['next']}"]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def svg_histogram(site: np.ndarray, ref: np.ndarray, lo: float, hi: float, title: str,
                  bins: int = 20) -> str:
    """Site (filled) and reference (outline) histograms as shares per bin, an inline SVG."""
    w, h, pad = 420, 160, 24
    edges = np.linspace(lo, hi, bins + 1)
    shares = [np.histogram(np.clip(x, lo, hi), edges)[0] / max(1, x.size) for x in (site, ref)]
    top = max(1e-9, max(float(s.max()) for s in shares))
    bw = (w - 2 * pad) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{pad}" y="14" font-size="12">{html.escape(title)}</text>']
    for k, (share, style) in enumerate(zip(shares, ('fill="#3b6ea5" fill-opacity="0.6"',
                                                    'fill="none" stroke="#b00020"'),
                                           strict=True)):
        if k == 1 and not ref.size:
            continue
        for i, v in enumerate(share):
            bh = (h - 2 * pad) * v / top
            parts.append(f'<rect x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" '
                         f'width="{bw:.1f}" height="{bh:.1f}" {style}/>')
    parts += [f'<text x="{pad}" y="{h - 6}" font-size="11">{lo:g}</text>',
              f'<text x="{w - pad - 20}" y="{h - 6}" font-size="11">{hi:g}</text>',
              f'<text x="{pad}" y="{h + 18}" font-size="11">blue: site; red outline: '
              'reference (share of images per bin)</text></svg>']
    return "".join(parts)


def render_html(s: dict) -> str:
    """A self-contained page: advice, counts, reasons, both histograms, flagged files."""
    e = html.escape
    f, a = s["flagged"], s["advice"]
    p_site, p_ref = s["_hist"]["prob"]
    d_site, d_ref = s["_hist"]["domain_score"]
    d_hi = max(2.0, float(np.percentile(d_site, 95)) if d_site.size else 2.0)
    body = [f"<h1>Site check: {e(s['site'])}</h1>",
            f"<p class='disclaimer'>{e(DISCLAIMER)}</p>",
            f"<h2>Advice: {e(a['verdict'])}</h2><p>{e(a['why'])}.</p><p>Next: {e(a['next'])}"
            "</p>", "<h2>Summary</h2><pre>" + e(render_text(s)) + "</pre>",
            "<h2>Why images were flagged</h2>",
            html_table((["check", "images"], [[k, v] for k, v in f["reasons"].items()])),
            "<h2>Distributions</h2>",
            svg_histogram(p_site, p_ref, 0.0, 1.0, "P(fractured)"),
            svg_histogram(d_site, d_ref, 0.0, round(d_hi, 1), "domain_score (> 1: flagged)"),
            f"<h2>Flagged files (first 100 of {len(f['files'])})</h2>",
            html_table((["file", "warning"], [list(x) for x in f["files"][:100]])),
            f"<h2>Unreadable files ({len(s['unreadable'])})</h2>",
            html_table((["file", "reason"], [[u["file"], u["reason"]]
                                             for u in s["unreadable"][:100]]))]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Site check"
            f"</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>")


def as_json(s: dict) -> dict:
    """``s`` without the raw arrays the histograms use."""
    return {k: v for k, v in s.items() if not k.startswith("_")}
