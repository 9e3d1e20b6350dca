"""Evaluate a run or ensemble folder on a labelled data set and write its ``Results/``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bonefrac import DISCLAIMER, InputError
from bonefrac.data.boxes import box_classes, dataset_boxes
from bonefrac.data.dataset import DatasetIndex, Sample, decode_all
from bonefrac.evaluation import plots
from bonefrac.evaluation.calibration import calibrated_prob
from bonefrac.evaluation.detection import detection_report
from bonefrac.evaluation.localisation import localisation_metrics
from bonefrac.evaluation.metrics import (
    binary_metrics,
    brier_score,
    expected_calibration_error,
    log_loss,
)
from bonefrac.evaluation.report import write_split_results
from bonefrac.evaluation.thresholds import DEFAULT_POLICY, choose_threshold
from bonefrac.inference.ensemble import Ensemble, fuse
from bonefrac.utils import atomic_write, cache_dir, write_json


@dataclass
class SplitOutputs:
    samples: list[Sample]
    y: np.ndarray  # (N,)
    logits: dict[str, np.ndarray]  # member -> (N, 2)
    skipped: list[tuple[str, str]]


class EnsembleInputs(NamedTuple):
    """``samples`` decoded for an ensemble (what :func:`decode_inputs` returns): ``gray``
    ``{size: (N, size, size) uint8}`` for every input size, resized as ``ens.resize`` says; the
    N ``kept`` samples; the ``skipped`` ``(file, reason)``; ``aspects`` ``(N,)`` width/height
    of each kept image (for letterbox heat maps)."""

    gray: dict[int, np.ndarray]
    kept: list[Sample]
    skipped: list[tuple[str, str]]
    aspects: np.ndarray


def decode_inputs(ens: Ensemble, samples: Sequence[Sample], desc: str) -> EnsembleInputs:
    """``samples`` decoded for ``ens`` through the shared decode cache."""
    gray = {}
    for size in sorted(ens.sizes):
        d = decode_all(samples, size, resize=ens.resize, desc=desc,
                       cache_dir=cache_dir() / "decoded")
        gray[size] = d.images
    return EnsembleInputs(gray, d.kept, d.skipped, d.aspects)


def collect(ens: Ensemble, samples: Sequence[Sample], desc: str, batch: int = 64
            ) -> SplitOutputs:
    """Decode ``samples`` (skipping unreadable files) and run every member on them."""
    gray, kept, skipped, _ = decode_inputs(ens, samples, desc)
    logits: dict[str, list] = {m.name: [] for m in ens.members}
    n = len(kept)
    for i in range(0, n, batch):
        out = ens.member_logits({s: g[i:i + batch] for s, g in gray.items()})
        for name, (lg, _) in out.items():
            logits[name].append(lg)
    return SplitOutputs(kept, np.array([s.label for s in kept], dtype=np.int64),
                        {k: np.concatenate(v) if v else np.zeros((0, 2)) for k, v in
                         logits.items()}, skipped)


def member_probs(ens: Ensemble, logits: dict[str, np.ndarray], calibrated: bool = True
                 ) -> dict[str, np.ndarray]:
    return {m.name: calibrated_prob(logits[m.name], m.temperature if calibrated else 1.0)
            for m in ens.members}


def threshold_note(ens: Ensemble, *, split: str, refit: str | None = None) -> str:
    meta = ens.meta
    lines = [f"Decision threshold for {ens.model_id}", ""]
    if refit:
        lines += [f"threshold = {ens.threshold:.4f}, RE-TUNED ON THE EVALUATED DATA ({refit}).",
                  "This makes the metrics below optimistic: the threshold has seen these labels."]
    else:
        lines += [
            f"threshold = {ens.threshold:.4f} on the fused, calibrated P(fractured).",
            f"Policy: {meta.get('threshold_policy', '?')} - {meta.get('threshold_how', '')}.",
            f"Chosen on the VALIDATION split ({meta.get('fitted_on', {}).get('val_n', '?')} "
            f"images) only; the {split} split was never used to choose it.",
            "Why this policy: a missed fracture (false negative) is the costlier error, so the "
            "default keeps sensitivity >= 0.95 on validation and takes the highest specificity "
            "that allows."]
    if ens.operating_points:
        lines += ["", "Named operating points (also chosen on validation):"]
        for name, op in ens.operating_points.items():
            lines.append(f"  {name:13s} t={op['threshold']:.4f}  {op['policy']:18s} "
                         f"{op['description']}")
    lines += ["", DISCLAIMER]
    return "\n".join(lines)


PACKAGE_DIR = Path(__file__).resolve().parent.parent


def inside_package(path: str | Path) -> bool:
    """Whether ``path`` lies inside the installed bonefrac package (a shipped model's
    folder): nothing writes there unless told to in so many words."""
    return Path(path).resolve().is_relative_to(PACKAGE_DIR)


def default_results_dir(model_dir: str | Path) -> Path:
    """Where evaluation results go, and where ``bonefrac report`` looks for them, when no
    folder is given: ``MODEL/Results``, except for a shipped model (inside the package),
    whose results go to ``Results/<model folder name>/`` in the working directory, so that
    its shipped ``Results/`` stay as they are."""
    root = Path(model_dir)
    return Path("Results") / root.resolve().name if inside_package(root) else root / "Results"


def evaluate_model(model_dir: str | Path, index: DatasetIndex, *, split: str = "test",
                   out: str | Path | None = None, refit_threshold: bool = False,
                   subgroup: str | None = None, backend: str = "auto",
                   compare_with: str | Path | None = None) -> dict:
    """Write the full artifact set for ``model_dir`` on ``index``'s ``split`` and return metrics.

    ``out``: default :func:`default_results_dir`. ``compare_with``: another model folder, run
    on the same images; ``comparison.md`` gains
    the two side by side (paired bootstrap CI of the AUC difference, both error types).

    The model's stored threshold and operating points are used as they are (chosen on its
    validation split); ``refit_threshold`` re-tunes them on the evaluated data and says so.
    When the data set has a ``boxes.csv`` and the split has fractured images with boxes, the
    localisation metrics are added (:func:`evaluate_localisation`, key ``"localisation"``).
    """
    ens = Ensemble.load(model_dir, backend=backend)
    if subgroup:
        check_subgroup_column(index.split(split), subgroup)  # fail before any model runs
    boxes = dataset_boxes(index.root)  # a malformed boxes.csv fails before any model runs
    is_ens = len(ens.members) > 1
    sfx = "_ensemble" if is_ens else ""
    res = Path(out) if out else default_results_dir(ens.root)
    res.mkdir(parents=True, exist_ok=True)
    so = collect(ens, index.split(split), desc=f"evaluating {split}")
    if len(so.y) == 0:
        raise InputError(f"no readable images in split {split!r} of {index.root}")
    probs = member_probs(ens, so.logits)
    p = fuse(probs, ens.weights)
    p_raw = fuse(member_probs(ens, so.logits, calibrated=False), ens.weights)
    refit = None
    if refit_threshold:
        ens.threshold, how = choose_threshold(so.y, p, ens.meta.get("threshold_policy",
                                                                    DEFAULT_POLICY))
        refit = f"{split} split of {index.root}: {how}"
    title = f"{ens.model_id} ({split}, n={len(so.y)})"
    roc = {**probs, "ensemble (fused)": p} if is_ens else None
    metrics = write_split_results(res, so.y, p, ens.threshold,
                                  threshold_note(ens, split=split, refit=refit),
                                  suffix=sfx, title=title, roc_probs=roc)
    ops = {name: {**op, "metrics": binary_metrics(so.y, p, op["threshold"])}
           for name, op in ens.operating_points.items()}
    if ops:
        plots.plot_threshold_robustness(so.y, p, res / "threshold_robustness.png",
                                        f"{ens.model_id} on {split}",
                                        {k: v["threshold"] for k, v in ops.items()})
    calibration = {name: {"ece_15": expected_calibration_error(so.y, q),
                          "brier": brier_score(so.y, q), "nll": log_loss(so.y, q)}
                   for name, q in (("before", p_raw), ("after", p))}
    plots.plot_reliability(so.y, {"before calibration": p_raw, "after calibration": p},
                           res / "reliability_diagram.png", f"Reliability - {ens.model_id}")
    _write_curves(ens, Path(model_dir), res, prefix=is_ens)
    result = {
        "model_id": ens.model_id, "data": str(index.root), "split": split,
        "split_source": index.source, "n": int(len(so.y)),
        "threshold": ens.threshold, "threshold_refit_on_this_data": bool(refit),
        "metrics": metrics, "operating_points": ops, "calibration": calibration,
        "members": {n: binary_metrics(so.y, q, _own_threshold(ens.members[i],
                                                                       ens.threshold))
                    for i, (n, q) in enumerate(probs.items())} if is_ens else {},
        "skipped": [{"file": f, "reason": r} for f, r in so.skipped],
        "disclaimer": DISCLAIMER,
    }
    if subgroup:
        result["subgroups"] = subgroup_metrics(so, p, ens.threshold, subgroup)
    if is_ens:
        from bonefrac.evaluation.comparison import write_comparison

        result["comparison"] = write_comparison(res, ens, so.y, probs, p, split)
    if boxes:
        loc = evaluate_localisation(ens, so.samples, boxes, res)
        if loc is not None:
            result["localisation"] = loc
        result["detection"] = evaluate_detection(ens, so.samples, boxes,
                                                 box_classes(index.root), res)
    if compare_with:
        result["compared_with"] = _compare_with(ens, p, so, compare_with, res, split, boxes,
                                                result.get("localisation"), backend)
    write_json(res / "metrics.json", result)
    write_json(res / "predictions.json", [
        {"file": s.rel, "label": int(y), "prob": float(q),
         **{f"prob_{n}": float(v[i]) for n, v in probs.items()}}
        for i, (s, y, q) in enumerate(zip(so.samples, so.y, p, strict=True))])
    return result


def _compare_with(ens: Ensemble, p: np.ndarray, so: SplitOutputs, other_dir: str | Path,
                  res: Path, split: str, boxes, loc: dict | None, backend: str) -> dict:
    """Run the other model on the same images and append the two-model table to
    ``comparison.md`` (:func:`~bonefrac.evaluation.comparison.write_model_comparison`)."""
    import tempfile

    from bonefrac.evaluation.comparison import write_model_comparison

    other = Ensemble.load(other_dir, backend=backend)
    oo = collect(other, so.samples, desc=f"evaluating {split} ({other.model_id})")
    if [s.rel for s in oo.samples] != [s.rel for s in so.samples]:
        raise InputError(f"{other_dir}: could not read the same images as {ens.model_id}")
    q = fuse(member_probs(other, oo.logits), other.weights)
    other_loc = None
    if boxes:
        with tempfile.TemporaryDirectory() as tmp:
            other_loc = evaluate_localisation(other, so.samples, boxes, Path(tmp))
    return write_model_comparison(res, so.y, {
        ens.model_id: {"prob": p, "threshold": ens.threshold, "localisation": loc},
        other.model_id: {"prob": q, "threshold": other.threshold, "localisation": other_loc}},
        split)


LOC_BATCH = 32  # images per explain=True run: the maps stay small in memory
MISSES_DIR = "localisation_misses"
N_GALLERY = 8


def scored_samples(samples: Sequence[Sample], boxes: Mapping[str, np.ndarray]) -> list[Sample]:
    """The samples localisation scores: fractured images with at least one box."""
    return [s for s in samples if s.label == 1 and len(boxes.get(s.rel, ())) > 0]


def evaluate_localisation(ens: Ensemble, samples: Sequence[Sample],
                          boxes: Mapping[str, np.ndarray], res: Path, *,
                          batch: int = LOC_BATCH, n_gallery: int = N_GALLERY) -> dict | None:
    """Localisation metrics of ``ens``'s heat maps against ``boxes`` (``dataset_boxes``).

    Runs the model with ``explain=True`` on the fractured samples that have a box (in batches
    of ``batch``), scores them with
    :func:`~bonefrac.evaluation.localisation.localisation_metrics`, writes
    ``res/localisation.json`` (the summary plus one record per image) and a gallery of the
    ``n_gallery`` worst pointing misses to ``res/localisation_misses/NN_<name>.png``.
    Returns the summary for ``metrics.json`` (worst misses with their files), or None when no
    sample has a box.
    """
    gallery = res / MISSES_DIR
    for old in gallery.glob("*.png") if gallery.is_dir() else ():
        old.unlink()  # no stale figures from an earlier evaluation
    scored = scored_samples(samples, boxes)
    if not scored:
        return None
    gray, kept, _, aspects = decode_inputs(ens, scored, "localisation")
    if not kept:
        return None
    peaks, pred_boxes, maps = [], [], []
    for i in range(0, len(kept), batch):
        pred = ens.predict_gray({s: g[i:i + batch] for s, g in gray.items()}, explain=True,
                                aspect=aspects[i:i + batch])
        peaks.append(pred.loc.peak)
        pred_boxes.append(pred.loc.box)
        maps.append(np.asarray(pred.cam, np.float32))
    peak, pbox, cam = np.concatenate(peaks), np.concatenate(pred_boxes), np.concatenate(maps)
    gt = [np.asarray(boxes[s.rel], np.float32).reshape(-1, 4) for s in kept]
    loc = localisation_metrics(peak, pbox, cam, gt, n_worst=n_gallery)
    per_image = loc.pop("per_image")
    big = max(gray)
    for rank, w in enumerate(loc["worst_misses"], start=1):
        i = w["index"]
        w["file"] = kept[i].rel
        w["png"] = f"{MISSES_DIR}/{rank:02d}_{_safe_stem(kept[i].rel)}.png"
        write_miss_png(res / w["png"], image_view(gray[big][i], float(aspects[i]), ens.resize),
                       cam[i], gt[i], peak[i], pbox[i],
                       f"#{rank} distance {w['distance']:.3f}  {kept[i].rel}")
    write_json(res / "localisation.json", {**loc, "images": [
        {"file": s.rel, "boxes": gt[i].tolist(), "peak": peak[i].tolist(),
         "box": pbox[i].tolist(), **{k: v[i] for k, v in per_image.items()}}
        for i, s in enumerate(kept)]})
    return loc


def split_detections(ens: Ensemble, samples: Sequence[Sample], boxes: Mapping[str, np.ndarray],
                     *, batch: int = LOC_BATCH
                     ) -> tuple[list[Sample], list[tuple[np.ndarray, np.ndarray]],
                                list[np.ndarray]]:
    """(the readable samples, their detections (boxes ``(K, 4)`` fractions of the image,
    scores ``(K,)``), their annotated boxes ``(M, 4)``). Without a detection head, an image's
    one detection is its heat-map box scored by the map's peak (what ``predict`` lists)."""
    gray, kept, _, aspects = decode_inputs(ens, samples, "detection")
    dets: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(0, len(kept), batch):
        pred = ens.predict_gray({s: g[i:i + batch] for s, g in gray.items()}, explain=True,
                                aspect=aspects[i:i + batch])
        dets += pred.detections if pred.detections is not None else [
            (pred.loc.box[j:j + 1], pred.loc.score[j:j + 1]) for j in range(len(pred.prob))]
    empty = np.zeros((0, 4), np.float32)
    return kept, dets, [np.asarray(boxes.get(s.rel, empty), np.float32).reshape(-1, 4)
                        for s in kept]


def evaluate_detection(ens: Ensemble, samples: Sequence[Sample],
                       boxes: Mapping[str, np.ndarray], regions: Mapping[str, str], res: Path,
                       *, batch: int = LOC_BATCH) -> dict:
    """Detection metrics (:func:`~bonefrac.evaluation.detection.detection_report`) of every
    sample, fractured or not, against ``boxes``; ``regions``: an image's box class. A model
    without a detection head is scored on its heat-map box (its one detection, scored by the
    map's peak), as ``bonefrac predict`` lists it. Writes ``res/detection.json`` (the summary
    and each image's detections) and returns the summary for ``metrics.json``."""
    kept, dets, gts = split_detections(ens, samples, boxes, batch=batch)
    report = detection_report(dets, gts, [regions.get(s.rel, "") for s in kept])
    report["source"] = "detection head" if ens.detector else "heat-map box (no detection head)"
    report["gallery"] = write_detection_gallery(res / DETECTION_DIR, kept, dets, gts,
                                                ens.box_threshold)
    write_json(res / "detection.json", {**report, "images": [
        {"file": s.rel, "boxes": gts[i].tolist(), "detections": dets[i][0].tolist(),
         "scores": dets[i][1].tolist()} for i, s in enumerate(kept)]})
    return report


DETECTION_DIR = "detection_gallery"


def write_detection_gallery(folder: Path, kept: Sequence[Sample],
                            dets: Sequence[tuple[np.ndarray, np.ndarray]],
                            gts: Sequence[np.ndarray], min_score: float, n: int = 4
                            ) -> list[dict]:
    """Figures of the ``n`` worst misses (fractured images whose boxes no detection at or
    above ``min_score`` found with IoU >= 0.5, by their best wrong score) and the ``n`` worst
    false boxes (the highest-scoring detections on non-fractured images), each image decoded
    at its own size with the annotated boxes in green and its detections in yellow, so boxes
    land where ``boxes.csv`` and ``detections.csv`` say. Returns one record per figure."""
    from bonefrac.data.io import load_gray
    from bonefrac.inference.detect import box_iou

    for old in folder.glob("*.png") if folder.is_dir() else ():
        old.unlink()
    shown = [(b[s >= min_score], s[s >= min_score]) for b, s in dets]
    top = [float(s.max()) if len(s) else 0.0 for _, s in shown]
    missed = [i for i, g in enumerate(gts) if len(g) and not (
        len(shown[i][0]) and (box_iou(np.asarray(g, np.float64),
                                      shown[i][0].astype(np.float64)) >= 0.5).any())]
    false = [i for i, g in enumerate(gts) if not len(g) and len(shown[i][0])]
    picks = ([("miss", i) for i in sorted(missed, key=lambda i: -top[i])[:n]]
             + [("false", i) for i in sorted(false, key=lambda i: -top[i])[:n]])
    out = []
    for k, (kind, i) in enumerate(picks, start=1):
        png = f"{DETECTION_DIR}/{k:02d}_{kind}_{_safe_stem(kept[i].rel)}.png"
        write_boxes_png(folder.parent / png, load_gray(kept[i].path, None), gts[i], *shown[i],
                        f"{kind}: {kept[i].rel}")
        out.append({"kind": kind, "file": kept[i].rel, "png": png, "top_score": top[i]})
    return out


def write_boxes_png(path: Path, gray: np.ndarray, gt: np.ndarray, boxes: np.ndarray,
                    scores: np.ndarray, caption: str) -> None:
    """``gray`` ``(H, W)`` at its own size with annotated boxes ``(k, 4)`` in green and
    detections ``(m, 4)`` in yellow labelled with their scores (fractions of width/height)."""
    from PIL import Image, ImageDraw

    h, w = gray.shape
    im = Image.new("RGB", (w, h + 18), (20, 22, 25))
    im.paste(Image.fromarray(gray).convert("RGB"), (0, 0))
    d = ImageDraw.Draw(im)
    lw = max(1, round(max(w, h) / 256))
    for b in np.asarray(gt).reshape(-1, 4):
        d.rectangle([float(v) * (w, h)[j % 2] for j, v in enumerate(b)], outline=(0, 230, 0),
                    width=lw + 1)
    for b, sc in zip(np.asarray(boxes).reshape(-1, 4), scores, strict=True):
        xy = [float(v) * (w, h)[j % 2] for j, v in enumerate(b)]
        d.rectangle(xy, outline=(255, 220, 0), width=lw)
        d.text((xy[0], max(0, xy[1] - 11)), f"{float(sc):.2f}", fill=(255, 220, 0))
    d.text((3, h + 3), caption[:w // 6], fill=(235, 235, 235))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        im.save(f, format="PNG")


def _safe_stem(rel: str, limit: int = 60) -> str:
    stem = Path(rel).stem
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:limit]


def image_view(square: np.ndarray, aspect: float, resize: str, side: int = 448) -> np.ndarray:
    """The image in a model input ``square`` ``(S, S)`` uint8 at its own aspect (width /
    height ``aspect``), longest side ``side``: a letterbox's bars cropped off, a stretched
    square stretched back. Heat maps, peaks and boxes are fractions of this frame (the
    original image's), so the gallery draws them all on it."""
    from PIL import Image

    from bonefrac.data.preprocess import letterbox_rect

    if resize == "letterbox":
        s = square.shape[0]
        x0, y0, x1, y1 = (round(v * s) for v in letterbox_rect(aspect, 1.0))
        square = square[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    w, h = ((side, max(1, round(side / aspect))) if aspect >= 1
            else (max(1, round(side * aspect)), side))
    return np.asarray(Image.fromarray(square).resize((w, h), Image.BILINEAR))


def write_miss_png(path: Path, gray: np.ndarray, cam: np.ndarray, gt: np.ndarray,
                   peak: np.ndarray, box: np.ndarray, caption: str,
                   alpha: float = 0.4) -> None:
    """One gallery figure: the image ``gray`` ``(H, W)`` uint8 in its own frame
    (:func:`image_view`) with the map (scaled to its own peak, opacity ``alpha``), the
    ground-truth boxes ``(k, 4)`` in green, the predicted box in yellow, the peak ``(x, y)`` as
    a red cross and a caption strip. All coordinates are fractions of the image's width and
    height, the frame of ``cam`` too."""
    from PIL import Image, ImageDraw

    from bonefrac.inference.heatmap import overlay

    h, w = gray.shape
    m = np.clip(cam, 0, None)
    m = m / m.max() if m.max() > 0 else m
    im = Image.new("RGB", (w, h + 18), (20, 22, 25))
    im.paste(overlay(gray, m, alpha), (0, 0))
    d = ImageDraw.Draw(im)

    def px(b: np.ndarray) -> list[float]:
        return [float(v) * (w, h)[k % 2] for k, v in enumerate(b)]

    d.rectangle(px(box), outline=(255, 220, 0), width=1)
    for b in gt:
        d.rectangle(px(b), outline=(0, 230, 0), width=2)
    x, y = px(peak)
    d.line([(x - 7, y), (x + 7, y)], fill=(255, 30, 30), width=2)
    d.line([(x, y - 7), (x, y + 7)], fill=(255, 30, 30), width=2)
    d.text((3, h + 3), caption[:w // 6], fill=(235, 235, 235))
    with atomic_write(path, "wb") as f:
        im.save(f, format="PNG")


# Names of the YOLO class ids in the shared set's groups.csv ``yolo_classes`` column (the order of
# the Roboflow export's data.yaml). Only fracture boxes carry a class, so these are body regions
# of FRACTURED images; a non-fractured image has no box and therefore no region.
YOLO_CLASS_NAMES = ("elbow positive", "fingers positive", "forearm fracture", "humerus fracture",
                    "humerus", "shoulder fracture", "wrist positive")


def check_subgroup_column(samples: Sequence[Sample], column: str) -> None:
    """Raise ``ValueError`` (one line, naming the available columns) unless some sample has a
    value in ``column``; cheap, so callers can check before any model runs."""
    if not any(s.attrs.get(column) for s in samples):
        cols = sorted({k for s in samples for k, v in s.attrs.items() if v})
        raise InputError(f"no image has a value in column {column!r} of manifest.csv/groups.csv"
                         f" (columns with values: {', '.join(cols) or 'none'})")


def subgroup_keys(value: str | None, column: str) -> list[str]:
    """The subgroup(s) of one image; ``yolo_classes`` holds space-separated class ids, and an
    image with boxes of several classes belongs to each of them."""
    if not value:
        return ["(none)"]
    if column != "yolo_classes":
        return [value]
    ids = sorted(set(value.split()), key=lambda i: (len(i), i))  # numeric order for ids
    return [YOLO_CLASS_NAMES[int(i)] if i.isdigit() and int(i) < len(YOLO_CLASS_NAMES)
            else f"class {i}" for i in ids]


def subgroup_metrics(so: SplitOutputs, p: np.ndarray, threshold: float, column: str) -> dict:
    """Metrics (with CIs) per value of a manifest/groups column at ``threshold``.

    Missing values form the group ``(none)``. A subgroup with one class only gets the one metric
    it can estimate (sensitivity for positives, specificity for negatives); every other metric is
    ``None`` with the reason (valid JSON, unlike NaN), so nothing over-claims: a positives-only
    group would otherwise show PPV = 1. For ``yolo_classes`` the ids are mapped to body-region
    names (:data:`YOLO_CLASS_NAMES`).

    Returns: ``{"column", "threshold", "note", "groups": {name: binary_metrics + "estimable"}}``.
    """
    check_subgroup_column(so.samples, column)
    keys = [subgroup_keys(s.attrs.get(column), column) for s in so.samples]
    groups = {}
    for k in sorted({k for ks in keys for k in ks}, key=lambda k: (k == "(none)", k)):
        m = np.array([k in ks for ks in keys])
        groups[k] = _estimable_only(binary_metrics(so.y[m], p[m], threshold))
    note = f"Subgroups by the value of column {column!r}; CIs as for the whole set."
    if column == "yolo_classes":
        note = ("Body regions from the YOLO classes of the fracture boxes; an image with boxes "
                "of several classes counts in each.")
        if all(g["n_negative"] == 0 for k, g in groups.items() if k != "(none)"):
            note += (" Only fractured images have boxes, so every region holds fractured images "
                     "only: per region the sensitivity is reported with its Wilson 95% CI, and "
                     "specificity (also PPV, NPV, AUC) is NOT estimable per region because "
                     "non-fractured images carry no region label. '(none)' holds the images "
                     "without a box: its specificity is the specificity over all regions.")
    return {"column": column, "threshold": float(threshold), "note": note, "groups": groups}


_METRIC_KEYS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "roc_auc")


def _estimable_only(m: dict) -> dict:
    """Blank out what a one-class subgroup cannot estimate (value None, reason given)."""
    if m["n_positive"] and m["n_negative"]:
        return {**m, "estimable": list(_METRIC_KEYS)}
    keep = "sensitivity" if m["n_positive"] else "specificity"
    why = ("no non-fractured images in this subgroup" if m["n_positive"]
           else "no fractured images in this subgroup")
    out = {**m, "estimable": [keep]}
    for key in _METRIC_KEYS:
        if key != keep:
            out[key] = {"value": None, "ci95": [None, None], "not_estimable": why}
    return out


def _own_threshold(m, default: float) -> float:
    """A member's own threshold (its spec's), else the model's."""
    return default if m.spec.threshold is None else m.spec.threshold


def _write_curves(ens: Ensemble, model_dir: Path, res: Path, prefix: bool) -> None:
    """accuracy.png / loss.png per member from its saved training history."""
    for m in ens.members:
        hist_file = model_dir / (m.spec.history or "history.json")
        if not hist_file.is_file():
            continue
        hist = json.loads(hist_file.read_text())
        pre = f"{m.name}_" if prefix else ""
        for key in ("accuracy", "loss"):
            plots.plot_curve(hist, key, res / f"{pre}{key}.png", f"{m.name}: {key}")


