"""Batch prediction over files and folders: decode in a thread pool, overlapped with ONNX Runtime.

Results for good files are never lost to bad ones: every unreadable file becomes one error row
(file + reason) and the run goes on.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonefrac import CLASSES, DISCLAIMER, __version__
from bonefrac.data.io import ImageReadError, load_gray
from bonefrac.inference.ensemble import Ensemble
from bonefrac.utils import write_json, write_text

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom",
                  ".gif", ""}


@dataclass
class PredictResult:
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"file", "reason"}


def list_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[dict]]:
    """Expand files and folders (recursively, sorted). Folders contribute files with an image
    or DICOM suffix, or none; symlinked folders are not followed (no loops). Returns
    (files, errors for inputs that do not exist)."""
    files, errors = [], []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            for root, dirs, names in os.walk(p, followlinks=False):
                dirs.sort()
                for n in sorted(names):
                    f = Path(root) / n
                    if f.suffix.lower() in IMAGE_SUFFIXES and not n.startswith("."):
                        files.append(f)
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            errors.append({"file": str(p), "reason": "no such file or folder"})
    return files, errors


def _decode(path: Path, sizes: Iterable[int]) -> tuple[dict[int, np.ndarray] | None, str]:
    try:
        return {s: load_gray(path, s) for s in sizes}, ""
    except ImageReadError as e:
        return None, e.reason


def _batches(files: Sequence[Path], sizes: set[int], batch: int, workers: int
             ) -> Iterator[tuple[list[Path], dict[int, np.ndarray], list[dict]]]:
    """Yield (paths, {size: (n, s, s)}, errors) per batch; decoding runs ahead in threads."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = ex.map(lambda f: _decode(f, sizes), files)
        paths, arrays, errors = [], [], []
        for f, (arr, err) in zip(files, results, strict=True):
            if arr is None:
                errors.append({"file": str(f), "reason": err})
            else:
                paths.append(f)
                arrays.append(arr)
            if len(paths) == batch:
                yield paths, {s: np.stack([a[s] for a in arrays]) for s in sizes}, errors
                paths, arrays, errors = [], [], []
        if paths or errors:
            yield paths, ({s: np.stack([a[s] for a in arrays]) for s in sizes} if paths
                          else {}), errors


def make_row(ens: Ensemble, path: Path, prob: float, member_probs: dict[str, float]) -> dict:
    decision = bool(prob >= ens.threshold)
    row = {"file": str(path), "prob_fractured": round(float(prob), 6)}
    row.update({f"prob_{k}": round(float(v), 6) for k, v in member_probs.items()})
    row.update({
        "decision": CLASSES[int(decision)],
        "confidence": round(float(prob if decision else 1 - prob), 6),
        "threshold": round(ens.threshold, 6)})
    for name, op in ens.operating_points.items():
        row[f"decision_{name}"] = CLASSES[int(prob >= op["threshold"])]
    row.update({"model_id": ens.model_id, "version": __version__, "warning": ""})
    return row


def predict_files(ens: Ensemble, files: Sequence[Path], *, batch_size: int = 32,
                  explain: bool = False, heatmap_dir: Path | None = None,
                  progress: bool = True, workers: int | None = None,
                  on_batch=None) -> PredictResult:
    """Predict every file; unreadable files become error rows, never exceptions."""
    from tqdm.auto import tqdm

    res = PredictResult()
    bar = tqdm(total=len(files), desc="predicting", unit="img", disable=not progress)
    for paths, gray, errors in _batches(files, ens.sizes, batch_size,
                                        workers or min(4, (os.cpu_count() or 2))):
        res.errors += errors
        if paths:
            pred = ens.predict_gray(gray, explain=explain)
            for i, f in enumerate(paths):
                res.rows.append(make_row(ens, f, pred.prob[i],
                                         {k: v[i] for k, v in pred.member_probs.items()}))
                if explain and heatmap_dir is not None:
                    from bonefrac.inference.heatmap import save_overlay

                    g = gray[max(gray)][i]
                    res.rows[-1]["heatmap"] = str(save_overlay(g, pred.cam[i], heatmap_dir, f,
                                                               pred.prob[i]))
        if on_batch:
            on_batch(res)
        bar.update(len(paths) + len(errors))
    bar.close()
    return res


def write_outputs(out: Path, res: PredictResult, ens: Ensemble) -> None:
    """``predictions.csv``, ``predictions.json`` and ``errors.csv``, each written atomically."""
    fields = list(res.rows[0]) if res.rows else ["file", "prob_fractured", "decision"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(res.rows)
    write_text(out / "predictions.csv", buf.getvalue())
    write_json(out / "predictions.json", {
        "model_id": ens.model_id, "version": __version__, "threshold": ens.threshold,
        "operating_points": {k: v["threshold"] for k, v in ens.operating_points.items()},
        "fusion_weights": ens.weights, "disclaimer": DISCLAIMER,
        "n_ok": len(res.rows), "n_failed": len(res.errors),
        "predictions": res.rows, "errors": res.errors})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["file", "reason"])
    w.writeheader()
    w.writerows(res.errors)
    write_text(out / "errors.csv", buf.getvalue())
