"""``MODEL_CARD.md`` (Mitchell et al., 2019) generated from a model folder and its ``Results/``.

Every number comes from the files: ``ensemble_meta.json`` (or a run's ``model.json``),
``Results/metrics.json`` and, where the training data folder is at hand, its ``manifest.csv`` /
``groups.csv`` / README. The same loaded :class:`ReportInputs` and tables feed the HTML report
(:mod:`bonefrac.evaluation.html_report`). No torch, no matplotlib: this runs on the light install.

``metrics.json`` may hold ``NaN`` (Python's json writes it for undefined metrics such as PPV when
nothing is called positive) or ``null``; both read as "undefined" and print as ``n/a``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bonefrac import CLASSES, DISCLAIMER, FRACTURE_MAP, InputError, __version__
from bonefrac.evaluation.report import METRIC_ROWS
from bonefrac.inference.model_folder import ModelFolder, member_heatmap
from bonefrac.inference.spec import MemberSpec
from bonefrac.utils import write_text

# Data sets whose provenance we have checked, keyed by a marker found in the data folder's
# README.md / ATTRIBUTION.md. Text is our own summary; numbers are computed from the folder.
KNOWN_DATASETS = {
    "bone-fracture-detection-daoon": {
        "name": 'Kaggle "Bone Fracture Detection: Computer Vision Project" (pkdarabi)',
        "summary": (
            "a Roboflow export (workspace `veda`, project `bone-fracture-detection-daoon`, "
            "version 4) of a YOLO fracture-detection data set, turned into two classes. "
            "The images look like Stanford MURA upper-extremity radiographs (unverified); if so, "
            "MURA's research-use terms may also apply."),
        "label_rule": (
            "`fractured` = the image has at least one fracture box in the detection labels, "
            "`non_fractured` = none. Images whose only box class is \"humerus\" (no fracture "
            "named; many show plates or prostheses) are counted as fractured: label noise."),
        "references": [
            "pkdarabi, Bone Fracture Detection: Computer Vision Project, Kaggle. "
            "https://www.kaggle.com/datasets/pkdarabi/bone-fracture-detection-computer-vision-"
            "project (CC BY 4.0)",
            "Roboflow Universe, veda / bone-fracture-detection-daoon, version 4.",
            "Rajpurkar P. et al., MURA: Large Dataset for Abnormality Detection in "
            "Musculoskeletal Radiographs, arXiv:1712.06957 (2017).",
        ],
        "noise_class": "4",  # yolo_classes value of the "humerus"-only images
    },
}
CARD_REFERENCES = [
    "Mitchell M. et al., Model Cards for Model Reporting, FAT* 2019, arXiv:1810.03993.",
    "Guo C. et al., On Calibration of Modern Neural Networks, ICML 2017 (temperature scaling).",
    "Selvaraju R. R. et al., Grad-CAM, ICCV 2017; Adebayo J. et al., Sanity Checks for Saliency "
    "Maps, NeurIPS 2018.",
    "Wilson E. B., Probable inference, the law of succession, and statistical inference, "
    "JASA 1927 (score interval).",
]
# Prevalences at which PPV/NPV are re-computed from sensitivity and specificity (Bayes' rule),
# to show how far the near-balanced test set's PPV/NPV are from a clinical setting.
ILLUSTRATIVE_PREVALENCES = (0.05, 0.10, 0.20)

Table = tuple[list[str], list[list[str]]]  # (header, rows) of display strings


# ---------------------------------------------------------------------------- loading
@dataclass
class DataInfo:
    """What the training data folder says about itself (all optional: it may be absent)."""

    path: str
    found: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # class -> images
    n_groups: int | None = None
    licence: str | None = None
    known: dict | None = None  # entry of KNOWN_DATASETS
    noise_images: int | None = None  # fractured images whose only box class is the noise class
    regions: dict[str, int] = field(default_factory=dict)  # region -> fractured images


@dataclass
class ReportInputs:
    model_dir: Path
    results_dir: Path
    meta: dict  # ensemble meta (a run's model.json seen as a one-member ensemble)
    metrics: dict  # Results/metrics.json
    is_run: bool
    comparison_md: str | None = None
    threshold_note: str | None = None
    pngs: list[Path] = field(default_factory=list)
    data: DataInfo | None = None
    heatmaps: list[Path] = field(default_factory=list)  # Results/*/heatmaps/*.png overlays
    # (figure, caption) of the worst localisation misses, Results/localisation_misses/*.png
    localisation_misses: list[tuple[Path, str]] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    """JSON that may contain NaN/Infinity (Python's json writes them); one-line errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None


def load_inputs(model_dir: str | Path, results_dir: str | Path | None = None,
                data_dir: str | Path | None = None) -> ReportInputs:
    """Read a model folder (ensemble or training run) and its evaluation results.

    Args:
        results_dir: default ``model_dir/Results`` (written by ``bonefrac evaluate``).
        data_dir: the training data folder, for the card's data section; default: the path
            recorded in the model's ``fitted_on``, used only if it exists here.
    Raises:
        ModelFileError: not a model folder, or its meta unreadable; FileNotFoundError /
            ValueError for a broken results file, each with a one-line message naming it.
    """
    folder = ModelFolder.open(model_dir)
    root, meta, is_run = folder.root, folder.meta, folder.is_run
    res = Path(results_dir) if results_dir else root / "Results"
    metrics = _read_json(res / "metrics.json") if (res / "metrics.json").is_file() else None
    if metrics is None:
        raise FileNotFoundError(f"{res / 'metrics.json'}: missing - run `bonefrac evaluate "
                                f"--model {root}` first")
    if not isinstance(metrics, dict) or "metrics" not in metrics:
        raise InputError(f"{res / 'metrics.json'}: not a bonefrac metrics file (no 'metrics')")
    sfx = "_ensemble" if (res / "threshold_note_ensemble.txt").is_file() else ""
    note = res / f"threshold_note{sfx}.txt"
    comp = res / "comparison.md"
    data = data_dir or meta.get("fitted_on", {}).get("data")
    return ReportInputs(
        root, res, meta, metrics, is_run,
        comparison_md=comp.read_text(encoding="utf-8") if comp.is_file() else None,
        threshold_note=note.read_text(encoding="utf-8") if note.is_file() else None,
        pngs=sorted(res.glob("*.png")),
        data=describe_data(data) if data else None,
        heatmaps=sorted(res.glob("*/heatmaps/*.png")),
        localisation_misses=localisation_misses(metrics, res))


def localisation_misses(metrics: dict, res: Path) -> list[tuple[Path, str]]:
    """(PNG, caption) of the worst localisation misses listed in ``metrics.json`` whose figure
    exists in the results folder ``res`` (only those: a stale figure is never shown)."""
    loc = metrics.get("localisation") or {}
    out = []
    for rank, w in enumerate(loc.get("worst_misses") or [], start=1):
        png = res / str(w.get("png", ""))
        if w.get("png") and png.is_file():
            out.append((png, f"#{rank} {w.get('file', '?')}: peak {fmt(w.get('distance'))} "
                             "from the nearest box (fraction of the image)"))
    return out


def describe_data(path: str | Path) -> DataInfo:
    """Counts, groups, licence and known provenance of a labelled data folder, if it exists."""
    root = Path(path)
    info = DataInfo(str(path))
    if not all((root / c).is_dir() for c in CLASSES):
        return info
    from bonefrac.data.dataset import scan_folder

    info.found = True
    info.counts = dict(Counter(CLASSES[s.label] for s in scan_folder(root)))
    text = " ".join(p.read_text(encoding="utf-8", errors="replace")
                    for p in (root / "README.md", root / "ATTRIBUTION.md") if p.is_file())
    lic = re.search(r"\bCC[ -]BY(?:[ -](?:SA|NC|ND))*[ -]\d\.\d\b", text)
    info.licence = lic.group(0) if lic else None
    info.known = next((v for k, v in KNOWN_DATASETS.items() if k in text), None)
    if (root / "groups.csv").is_file():
        with open(root / "groups.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        info.n_groups = len({r.get("group_id") for r in rows if r.get("group_id")}) or None
        fractured = [r for r in rows if r.get("path", "").startswith(f"{CLASSES[1]}/")]
        if fractured and "yolo_classes" in rows[0]:
            from bonefrac.evaluation.evaluate import subgroup_keys

            info.regions = dict(Counter(k for r in fractured
                                        for k in subgroup_keys(r["yolo_classes"],
                                                                "yolo_classes")))
            if info.known:
                noise = info.known["noise_class"]
                info.noise_images = sum(r["yolo_classes"].split() == [noise] for r in fractured)
    return info


# ------------------------------------------------------------------------- formatting
def num(x) -> float | None:
    """A finite float, or None for null / NaN / inf / non-numbers."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def fmt(x, digits: int = 3) -> str:
    v = num(x)
    return "n/a" if v is None else f"{v:.{digits}f}"


def fmt_metric(entry: dict | None, digits: int = 3) -> str:
    """``value [lo, hi] k/n`` of one metric entry of ``binary_metrics``; 'n/a' if undefined."""
    if not entry:
        return "n/a"
    if num(entry.get("value")) is None:
        return "not estimable" if entry.get("not_estimable") else "n/a"
    lo, hi = (entry.get("ci95") or [None, None])[:2]
    ci = f" [{fmt(lo, digits)}, {fmt(hi, digits)}]"
    frac = f" {entry['k']}/{entry['n']}" if "k" in entry else ""
    return f"{fmt(entry['value'], digits)}{ci}{frac}"


def operating_points(inp: ReportInputs) -> list[tuple[str, str, dict]]:
    """(column label, description, binary_metrics) for the default threshold and each named
    operating point that was evaluated."""
    m = inp.metrics
    refit = " (RE-FIT on these data)" if m.get("threshold_refit_on_this_data") else ""
    cols = [(f"default (t={fmt(m['metrics'].get('threshold'), 4)}){refit}",
             f"policy {inp.meta.get('threshold_policy', 'n/a')}", m["metrics"])]
    for name, op in (m.get("operating_points") or {}).items():
        cols.append((f"{name} (t={fmt(op.get('threshold'), 4)})",
                     f"{op.get('policy', '')}: {op.get('description', '')}", op["metrics"]))
    return cols


def metric_table(inp: ReportInputs) -> Table:
    cols = operating_points(inp)
    rows = [[label] + [fmt_metric(c[2].get(key)) for c in cols] for key, label in METRIC_ROWS]
    rows.append(["TP / FP / TN / FN"] + [
        "{tp} / {fp} / {tn} / {fn}".format(**c[2]["counts"]) if "counts" in c[2] else "n/a"
        for c in cols])
    return ["metric"] + [c[0] for c in cols], rows


def calibration_table(inp: ReportInputs) -> Table:
    """ECE (15 bins), Brier and NLL before/after temperature scaling, on validation (where it
    was fitted) and on the evaluated data."""
    rows = []
    val = inp.meta.get("validation") or {}
    where = [(f"validation (fitted here, n={val.get('n', 'n/a')})",
              val.get("calibration_before"), val.get("calibration_after")),
             (f"{inp.metrics.get('split', 'evaluated')} (n={inp.metrics.get('n', 'n/a')})",
              (inp.metrics.get("calibration") or {}).get("before"),
              (inp.metrics.get("calibration") or {}).get("after"))]
    for name, before, after in where:
        if before or after:
            b, a = before or {}, after or {}
            rows.append([name] + [f"{fmt(b.get(k), 4)} -> {fmt(a.get(k), 4)}"
                                  for k in ("ece_15", "brier", "nll")])
    return ["data", "ECE (15 bins)", "Brier", "NLL"], rows


def member_table(inp: ReportInputs) -> Table:
    """One row per member: architecture, ImageNet weights, temperature, weight, threshold,
    and (ensembles) its own metrics on the evaluated data."""
    evald = inp.metrics.get("members") or {}
    rows = []
    for s in inp.meta.get("members", []):
        e = evald.get(s["name"], {})
        rows.append([s["name"], s.get("arch", ""), str(s.get("config", {})
                                                       .get("backbone_weights", "not recorded")),
                     fmt(s.get("temperature"), 3), fmt(s.get("fusion_weight"), 2),
                     fmt(s.get("threshold"), 4), fmt_metric(e.get("roc_auc")),
                     fmt_metric(e.get("sensitivity")), fmt_metric(e.get("specificity"))])
    return ["member", "architecture", "pretrained weights", "temperature T", "fusion weight",
            "threshold", "AUC [95% CI]", "sensitivity", "specificity"], rows


def subgroup_table(inp: ReportInputs) -> tuple[Table, str] | None:
    """Per-subgroup metrics (``metrics.json`` "subgroups"), or None if not evaluated."""
    sg = inp.metrics.get("subgroups")
    if not sg:
        return None
    groups = sg.get("groups", sg) if isinstance(sg, dict) else {}
    rows = [[name, str(g.get("n", "")), str(g.get("n_positive", "")),
             str(g.get("n_negative", "")), fmt_metric(g.get("sensitivity")),
             fmt_metric(g.get("specificity")), fmt_metric(g.get("roc_auc"))]
            for name, g in groups.items() if isinstance(g, dict) and "n" in g]
    head = [f"{sg.get('column', 'subgroup')}", "n", "fractured", "non-fractured",
            "sensitivity [95% CI] k/n", "specificity [95% CI] k/n", "AUC [95% CI]"]
    return (head, rows), str(sg.get("note", ""))


LOCALISATION_ROWS = (
    ("pointing_game", "Pointing game (peak within 15/224 of a box)"),
    ("box_hit_rate", "Box hit rate (IoU >= 0.3)"),
    ("mass_inside", "Heat-map mass inside boxes"),
)


def localisation_table(inp: ReportInputs) -> Table | None:
    """Metric, value [95% CI] (k/n), centre and random baselines [95% CI] and n images, from
    ``metrics.json`` "localisation"; None when it was not evaluated (no boxes)."""
    loc = inp.metrics.get("localisation")
    if not loc:
        return None
    rows = []
    for key, label in LOCALISATION_ROWS:
        e = loc.get(key) or {}
        b = e.get("baselines") or {}
        rows.append([label, fmt_metric(e), fmt_metric(b.get("centre")),
                     fmt_metric(b.get("random")), str(e.get("n", loc.get("n_images", "n/a")))])
    return ["metric", "value [95% CI]", "centre baseline", "random baseline", "n images"], rows


def localisation_notes(inp: ReportInputs) -> list[str]:
    """What was scored and how each metric and baseline is defined (from ``metrics.json``)."""
    loc = inp.metrics.get("localisation") or {}
    bs = loc.get("bootstrap") or {}
    out = [f"Scored: the {loc.get('n_images', 'n/a')} fractured images of the evaluated set "
           f"that have a fracture box ({loc.get('n_boxes', 'n/a')} boxes, `boxes.csv`), "
           "whatever the model predicted for them. 95% CIs: percentile bootstrap over images "
           f"({bs.get('n_boot', 'n/a')} resamples, seed {bs.get('seed', 'n/a')}); baselines "
           "are resampled with the same images."]
    for key, label in LOCALISATION_ROWS:
        e = loc.get(key) or {}
        b = e.get("baselines") or {}
        out.append(f"{label}: {e.get('definition', 'n/a')}. Centre baseline: "
                   f"{(b.get('centre') or {}).get('definition', 'n/a')}; random baseline: "
                   f"{(b.get('random') or {}).get('definition', 'n/a')}.")
    return out


def _ci(v: float, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def detection_table(inp: ReportInputs) -> Table | None:
    """AP@0.5, COCO AP@[.5:.95] / AP@0.75 and FROC (with 95% CIs), then AP@0.5 per body
    region, from ``metrics.json`` "detection"; None when it was not evaluated (no boxes)."""
    det = inp.metrics.get("detection")
    if not det:
        return None
    rows = [["AP@0.5 (VOC all-point)", _ci(det["ap50"]["value"], det["ap50"].get("ci95")),
             str(det["n_images"])],
            ["COCO AP@[.5:.95]", f"{det['coco']['ap']:.3f}", str(det["n_images"])],
            ["COCO AP@0.75", f"{det['coco']['ap75']:.3f}", str(det["n_images"])]]
    rows += [[f"FROC sensitivity at {r} FP/image", _ci(e["sensitivity"], e.get("ci95")),
              str(det["n_images"])] for r, e in det["froc"].items()]
    rows += [[f"AP@0.5, {region}", f"{e['ap50']:.3f}", f"{e['n_images']} + normals"]
             for region, e in (det.get("per_region") or {}).items()]
    return ["metric", "value [95% CI]", "n images"], rows


def detection_notes(inp: ReportInputs) -> list[str]:
    """What the detection metrics scored and how."""
    det = inp.metrics.get("detection") or {}
    return [f"Scored: every image of the evaluated set ({det.get('n_images', 'n/a')} images, "
            f"{det.get('n_boxes', 'n/a')} fracture boxes); a box on a non-fractured image is a "
            f"false positive. Boxes from: {det.get('source', 'n/a')}; "
            f"{det.get('n_detections', 'n/a')} detections in all.",
            "A detection is true when its best-overlapping unmatched box has IoU >= 0.5 "
            "(greedy in score order, as PASCAL VOC and COCO). AP@0.5: VOC all-point "
            "interpolation; COCO numbers: pycocotools (101 recall points). FROC: the share of "
            "fracture boxes found at a score cut with at most that many false positives per "
            "image. 95% CIs: percentile bootstrap over images (1,000 resamples). Per region: "
            "that region's fractured images plus every non-fractured one."]


def model_date(inp: ReportInputs) -> str:
    """The UTC date the model was fitted on validation, as recorded at the fit; else the
    newest member file's modification date, said to be one (a git checkout resets it)."""
    date = inp.meta.get("fitted_on", {}).get("date")
    if date:
        return f"fitted {date} (UTC)"
    times = [(inp.model_dir / s[k]).stat().st_mtime for s in inp.meta.get("members", [])
             for k in ("weights", "onnx") if s.get(k) and (inp.model_dir / s[k]).is_file()]
    if not times:
        return "date not recorded"
    day = datetime.fromtimestamp(max(times), UTC).date().isoformat()
    return f"date not recorded; weights files modified {day} (UTC)"


def training_epochs(inp: ReportInputs, spec: dict) -> str:
    """``frozen 2 + finetune 1 epochs`` from the member's saved history, if present."""
    h = spec.get("history")
    path = inp.model_dir / h if h else None
    if not path or not path.is_file():
        return "history not saved"
    try:
        stages = Counter(e.get("stage", "?") for e in json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):
        return "history unreadable"
    return " + ".join(f"{k} {v}" for k, v in stages.items()) + " epochs"


def prevalence_lines(inp: ReportInputs) -> list[str]:
    """Observed prevalence and PPV/NPV re-computed at lower, illustrative prevalences."""
    m = inp.metrics["metrics"]
    n, npos = m.get("n") or 0, m.get("n_positive") or 0
    se, sp = num(m["sensitivity"].get("value")), num(m["specificity"].get("value"))
    out = [f"The evaluated set has {npos}/{n} fractured images (prevalence "
           f"{fmt(npos / n if n else None, 2)}); near-balanced, unlike clinical practice where "
           "fractures are the minority. PPV and NPV depend on prevalence and do not transfer."]
    if se is not None and sp is not None:
        parts = []
        for pi in ILLUSTRATIVE_PREVALENCES:
            ppv_d, npv_d = se * pi + (1 - sp) * (1 - pi), (1 - se) * pi + sp * (1 - pi)
            parts.append(f"at prevalence {pi:.2f}: PPV {fmt(se * pi / ppv_d if ppv_d else None)}"
                         f", NPV {fmt(sp * (1 - pi) / npv_d if npv_d else None)}")
        out.append("With the observed sensitivity and specificity at the default threshold, "
                   "Bayes' rule gives " + "; ".join(parts) + " (point estimates).")
    return out


def limitations(inp: ReportInputs) -> list[str]:
    m = inp.metrics["metrics"]
    d = inp.data
    out = []
    if d and d.noise_images is not None:
        out.append(f"Label noise: {d.noise_images} training-data images are labelled "
                   "fractured although their only detection box is \"humerus\" (often plates "
                   "or prostheses, no fracture named); the labels come from detection boxes, "
                   "not from a radiologist's read for this task.")
    elif d and d.known:
        out.append("Label noise: " + d.known["label_rule"])
    else:
        out.append("Label noise: the labels' origin and quality were not documented in the "
                   "training data folder available here; check them.")
    out.append("Domain shift: one public, web-collected data set (mostly upper extremity, "
               "many images downsized). Other hospitals, scanners, body parts, "
               "paediatric patients and DICOM windowing may change performance; validate "
               "externally (`bonefrac evaluate --split all`) before relying on any number.")
    out.append(gate_line(inp.meta.get("domain_gate")))
    out += [f"Site adaptation (`bonefrac adapt`): {n}" for n in
            (inp.meta.get("adapt") or {}).get("notes", [])]
    out += prevalence_lines(inp)
    widths = {k: num(m[k]["ci95"][1]) - num(m[k]["ci95"][0]) for k in ("sensitivity",
              "specificity", "roc_auc") if num(m[k].get("ci95", [None])[0]) is not None
              and num(m[k]["ci95"][1]) is not None}
    val_n = inp.meta.get("fitted_on", {}).get("val_n", "n/a")
    out.append(f"Small samples: the evaluated set has {m.get('n')} images and the thresholds "
               f"were chosen on {val_n} validation images; 95% CI widths here: "
               + ", ".join(f"{k} {v:.3f}" for k, v in widths.items())
               + ". Differences inside these intervals are not evidence of a difference.")
    for name, op in (inp.metrics.get("operating_points") or {}).items():
        t = num(op.get("threshold"))
        if t is not None and not 0.0 < t <= 1.0:
            out.append(f"Operating point '{name}' has threshold {t:.4f}: on validation no "
                       "threshold met its policy with any positive call, so it calls nothing "
                       "positive. Do not use it.")
    if inp.metrics.get("threshold_refit_on_this_data"):
        out.append("The threshold was RE-FIT on the evaluated data: its metrics are optimistic.")
    loc = inp.metrics.get("localisation")
    if loc:
        pg = loc.get("pointing_game") or {}
        rnd = (pg.get("baselines") or {}).get("random") or {}
        out.append(f"Localisation was checked against fracture boxes on {loc.get('n_images')} "
                   f"fractured images: pointing game {fmt(pg.get('value'))} against "
                   f"{fmt(rnd.get('value'))} for a random point (Localisation section). On any "
                   "one image the map can still point at the wrong place: it is a hint, not "
                   "evidence of where a fracture is.")
    else:
        out.append("Image-level labels only: no localisation ground truth, so the Grad-CAM "
                   "maps are unvalidated hints, not evidence of where a fracture is.")
    return out


def explanation(meta: dict) -> str:
    """What the heat map is, from the members' map kinds (``ensemble_meta.json``)."""
    kinds = {member_heatmap(s) for s in meta.get("members", [])}
    if kinds == {FRACTURE_MAP}:
        return ("the box-supervised fracture map: a 1x1 convolution on the last feature map "
                "gives one P(fracture) per cell, trained against the data set's fracture "
                "boxes; the members' maps are fused with the fusion weights, and the peak and "
                "box are read from the fused map.")
    grad = ("closed-form Grad-CAM of the fracture logit on the last feature maps, fused with "
            "the fusion weights")
    if FRACTURE_MAP in kinds:
        return f"per member, its box-supervised fracture map or {grad}."
    return f"{grad}."


def input_square(spec: dict) -> str:
    """``320 px letterbox (aspect kept, black bars)`` from a member's preprocessing (its
    entry in a meta read through the spec, so ``resize`` is always there)."""
    prep = MemberSpec.from_dict(spec).preprocessing
    how = {"letterbox": "letterbox (aspect kept, black bars)",
           "stretch": "stretched to a square"}[prep.resize]
    return f"{prep.size} px {how}"


def gate_line(gate: dict | None) -> str:
    """The limitation line of the model's input-domain gate (``ensemble_meta.json``)."""
    if not gate:
        return ("Input-domain gate: none is shipped with this model, so an image unlike the "
                "training data (another modality, a photograph) gets a probability like any "
                "other; fit one with `bonefrac ensemble gate`.")
    try:  # stored as text (the gate's fit info)
        share = f"{float(gate['val_flagged']):.1%}"
    except (KeyError, TypeError, ValueError):
        share = "n/a"
    return (f"Input-domain gate: {gate.get('how', 'fitted on the training features')}. It "
            f"flags {share} of validation images; a flagged image keeps its probability "
            "but gets the decision 'uncertain' with the reason (`--no-gate` turns this "
            "off). It catches inputs far from the training images (non-radiographs, other "
            "modalities), not every hospital's or scanner's shift: an image it passes is "
            "not thereby in the domain.")


# -------------------------------------------------------------------------- rendering
def md_table(table: Table) -> list[str]:
    head, rows = table

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    return (["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


SECTIONS = ("Model details", "Intended use", "Out-of-scope use", "Training data",
            "Evaluation data", "Metrics", "Quantitative analysis", "Calibration",
            "Subgroup results", "Known limitations", "Ethical considerations", "References")


def render_model_card(inp: ReportInputs) -> str:
    """The model card as Markdown, in Mitchell et al.'s sections (plus calibration)."""
    lines = [*_card_details(inp), "", *md_table(member_table(inp)), "", *_CARD_USE,
             *_card_training_data(inp), *_card_evaluation(inp), *_card_analysis(inp),
             *_card_closing(inp)]
    return "\n".join(lines)


def _card_details(inp: ReportInputs) -> list[str]:
    """Title, disclaimer, provenance and the Model details section (members listed)."""
    meta = inp.meta
    now = datetime.now(UTC).date().isoformat()
    version = meta.get("version")
    lines = [f"# Model card: {meta.get('model_id', inp.model_dir.name)}", "",
             f"> **{DISCLAIMER}**", "",
             f"Generated {now} by `bonefrac report` (bonefrac {__version__}) from "
             f"`{inp.model_dir.name}/` and `{inp.results_dir.name}/metrics.json`; every number "
             "below is read from those files.", "",
             "## Model details", "",
             f"- Model id: `{meta.get('model_id', inp.model_dir.name)}`; "
             + (f"built with bonefrac {version}" if version else
                "a single training run (bonefrac version not recorded in it)")
             + f"; {model_date(inp)}.",
             f"- Type: {'training run (one member)' if inp.is_run else 'ensemble'} of "
             f"{len(meta.get('members', []))} convolutional classifier(s): ImageNet-pretrained "
             "backbone, global average pooling, small MLP head, 2 logits "
             f"({', '.join(meta.get('classes', CLASSES))}); output P(fractured).",
             f"- Fusion: {meta.get('fusion', 'single member')} "
             f"({meta.get('weights_how', 'one member')}).",
             f"- Explanations: {explanation(meta)}",
             f"- Licence of the code: {_code_licence()}. Weights inherit the terms of their "
             "ImageNet initialisation and of the training data (below).", ""]
    for s in meta.get("members", []):
        lines.append(f"- Member `{s['name']}` ({s.get('arch')}): initialised from "
                     f"{s.get('config', {}).get('backbone_weights', 'not recorded')}"
                     + (f", then warm-started from `{s['config']['init_from']}`"
                        if s.get("config", {}).get("init_from") else "") + "; "
                     f"{training_epochs(inp, s)}; input {input_square(s)}, grayscale "
                     "replicated to 3 channels; weights sha256 "
                     f"{str(s.get('weights_sha256') or 'not recorded')[:16]}...")
    return lines


_CARD_USE = [  # Intended use and Out-of-scope use, and the next section's heading
    "## Intended use", "",
              "- Research and education on fracture classification of musculoskeletal "
              "radiographs: benchmarking, method development, studying calibration and "
              "explanations.",
              "- Users: machine-learning researchers and developers.", "",
              "## Out-of-scope use", "",
              "- **Any clinical decision**: diagnosis, triage, treatment or ruling out a "
              "fracture for a real patient. The model is not a medical device and has not been "
              "clinically validated.",
              "- Use without a qualified radiologist reading every image; use on body parts, "
              "modalities (CT, MRI) or populations (e.g. children) absent from training.",
              "- Reading the heat map, its peak or its box as proof of where a fracture is "
              "(or that there is none elsewhere): they are hints to check.", "",
              "## Training data", "",
]


def _card_training_data(inp: ReportInputs) -> list[str]:
    """The Training data section: source, licence, counts, how fitting used the splits."""
    d, fo = inp.data, inp.meta.get("fitted_on", {})
    lines = []
    if d and d.known:
        lines.append(f"- Source: {d.known['name']}: {d.known['summary']}")
        lines.append(f"- Label rule: {d.known['label_rule']}")
    lines.append(f"- Licence: {d.licence if d and d.licence else 'not stated in the data folder'}"
                 + (" (attribution required; see References)." if d and d.licence else "."))
    if d and d.found:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(d.counts.items()))
        lines.append(f"- The folder `{d.path}` holds {sum(d.counts.values())} images ({counts})"
                     + (f" in {d.n_groups} near-duplicate groups (rotated/zoomed copies of one "
                        "radiograph share a group and never straddle splits)"
                        if d.n_groups else "") + ".")
        if d.regions:
            lines.append("- Fractured images by body region (YOLO box class; an image may have "
                         "several): " + ", ".join(f"{k} {v}" for k, v in sorted(d.regions.items()))
                         + ".")
        if d.noise_images is not None:
            lines.append(f"- Label noise: {d.noise_images} fractured images carry only the box "
                         "class \"humerus\".")
    else:
        lines.append(f"- The training data folder `{fo.get('data', 'not recorded')}` is not "
                     "available here, so its contents are not summarised; pass `--data DIR`.")
    lines += [f"- Fitted on: split from {fo.get('split_source', 'n/a')}; images per split "
              f"{fo.get('splits', 'n/a')}; data fingerprint (sha256 of path, label, split) "
              f"`{str(fo.get('data_fingerprint', 'n/a'))[:16]}...`.",
              "- Temperatures, fusion weights, the threshold and both operating points were "
              f"fitted on the validation split only ({fo.get('val_n', 'n/a')} images).", "",
              ]
    return lines


def _card_evaluation(inp: ReportInputs) -> list[str]:
    """The Evaluation data and Metrics sections."""
    m, fo = inp.metrics, inp.meta.get("fitted_on", {})
    lines = [
              "## Evaluation data", "",
              f"- `{m.get('data')}`, split `{m.get('split')}` ({m.get('split_source')}): "
              f"{m['metrics'].get('n')} images, {m['metrics'].get('n_positive')} fractured, "
              f"{m['metrics'].get('n_negative')} non-fractured; {len(m.get('skipped') or [])} "
              "unreadable file(s) skipped."]
    same = fo.get("data") and Path(str(fo.get("data"))).resolve() == \
        Path(str(m.get("data"))).resolve()
    if same and m.get("split") == "test" and "external" not in str(m.get("split_source")):
        lines.append("- This is the held-out test split of the training data set: same source "
                     "and distribution, never used for fitting; NOT an external validation.")
    elif "external" in str(m.get("split_source")):
        lines.append("- External validation: every image of this folder was evaluated with the "
                     "stored threshold and operating points.")
    else:
        lines.append(f"- The `{m.get('split')}` split of a folder other than the training data "
                     "folder recorded in the model.")
    lines += ["", "## Metrics", "",
              "- Sensitivity, specificity, PPV, NPV and accuracy with Wilson score 95% CIs; F1 "
              "and ROC-AUC with stratified bootstrap percentile 95% CIs (2000 resamples, seed 0)."
              " Cells read `value [95% CI] k/n`.",
              "- Calibration: expected calibration error over 15 equal-width bins (ECE), Brier "
              "score and negative log-likelihood (NLL) of P(fractured).",
              "- Decision thresholds: the default and two named operating points, all chosen on "
              "validation:"]
    for label, desc, _ in operating_points(inp):
        lines.append(f"  - {label}: {desc}")
    if m.get("localisation"):
        lines.append("- Localisation against the data set's fracture boxes (`boxes.csv`): "
                     "pointing game, box hit rate (IoU >= 0.3) and the share of heat-map mass "
                     "inside the boxes, each with a bootstrap 95% CI beside a centre and a "
                     "random baseline (Quantitative analysis, Localisation).")
    return lines


def _card_analysis(inp: ReportInputs) -> list[str]:
    """Quantitative analysis: the metric table, the comparison and localisation."""
    lines = []
    lines += ["", "## Quantitative analysis", "", *md_table(metric_table(inp)), ""]
    if inp.comparison_md:
        body = inp.comparison_md.strip().splitlines()
        lines += ["### Baseline vs members vs ensemble", ""] + [
            ln for ln in body if not ln.startswith("# ")] + [""]
    lt = localisation_table(inp)
    if lt:
        lines += ["### Localisation", "", *[f"- {x}" for x in localisation_notes(inp)], "",
                  *md_table(lt), ""]
        if inp.localisation_misses:
            lines += [f"Worst misses (figures in `{inp.results_dir.name}/"
                      "localisation_misses/`): " + "; ".join(c for _, c in
                                                            inp.localisation_misses) + ".", ""]
    dt = detection_table(inp)
    if dt:
        lines += ["### Detection", "", *[f"- {x}" for x in detection_notes(inp)], "",
                  *md_table(dt), ""]
    return lines


def _card_closing(inp: ReportInputs) -> list[str]:
    """Calibration, subgroups, limitations, ethics and references."""
    d = inp.data
    lines = []
    lines += ["## Calibration", "",
              "Temperature scaling (one T per member, fitted on validation by minimising NLL), "
              "before -> after:", "", *md_table(calibration_table(inp)), "",
              "## Subgroup results", ""]
    sg = subgroup_table(inp)
    if sg:
        lines += [sg[1], "", *md_table(sg[0]), ""]
    else:
        lines += ["Not evaluated (run `bonefrac evaluate --subgroup COLUMN`, e.g. "
                  "`yolo_classes` on the bone-fracture set). No patient attributes (age, sex, "
                  "site) are available in the data, so performance across demographic groups is "
                  "unknown.", ""]
    lines += ["## Known limitations", "", *[f"- {x}" for x in limitations(inp)], "",
              "## Ethical considerations", "",
              "- Risk of harm: a false negative can delay treatment of a fracture; a false "
              "positive can cause needless imaging or immobilisation. Neither is acceptable from "
              "an unvalidated model, hence research use only.",
              "- Automation bias: a confident-looking probability or heat map can sway a reader; "
              "outputs must not be shown in clinical reading workflows.",
              "- Fairness: no age, sex or ethnicity labels exist for the data, so subgroup "
              "fairness cannot be assessed.",
              "- Privacy: public, de-identified images; the model stores no images.",
              "", "## References", ""]
    refs = (d.known["references"] if d and d.known else []) + CARD_REFERENCES
    lines += [f"- {r}" for r in refs] + ["", f"> **{DISCLAIMER}**", ""]
    return lines


def _code_licence() -> str:
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        md = metadata("bonefrac")
    except PackageNotFoundError:
        return "see the project's licence file"
    return md.get("License-Expression") or md.get("License") or "see the project's licence file"


def write_model_card(inp: ReportInputs, path: str | Path | None = None) -> Path:
    """Write ``MODEL_CARD.md`` (default: beside the results it reports, never into the model
    folder unless ``path`` says so) and return its path."""
    path = Path(path) if path else inp.results_dir / "MODEL_CARD.md"
    write_text(path, render_model_card(inp))
    return path
