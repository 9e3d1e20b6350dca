"""Batch prediction over files and folders: decode, preprocess and ONNX Runtime, in parallel.

Pipeline: the files are cut into small batches and ``workers`` threads each take a whole batch
through decode -> preprocessing -> every member -> fusion, ONNX Runtime running each graph on the
calling thread (one intra-op thread). Pillow releases the GIL while decoding and resizing, numpy
in its ufuncs and ONNX Runtime in ``run()``, so the threads really run in parallel, and while
one decodes the other infers. On 2 cores this data parallelism beats one run spread over both
cores: no per-operator synchronisation, no idle pool threads competing with decoding, and
batches of 8 keep the activations in cache (larger batches cost more per image). Measured with
``benchmarks/predict_throughput.py``.

Results for good files are never lost to bad ones: every unreadable file becomes one error row
(file + reason) and the run goes on. Rows come back in the order of the file list, which
:func:`list_inputs` makes canonical (sorted by path components), so sharded and resumed runs
reproduce the rows of a plain run exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonefrac import CLASSES, DISCLAIMER, InputError, __version__
from bonefrac.data.io import (
    IMAGE_SUFFIXES,
    Decoded,
    ImageReadError,
)
from bonefrac.data.isolation import DecodePool, decode_file
from bonefrac.inference.columns import write_schema
from bonefrac.inference.detections import (
    BOX_COLUMNS,
    DETECTION_COLUMNS,
    box_columns,
    detection_dicts,
    detection_rows,
    map_detection,
    shown_detections,
)
from bonefrac.inference.domain import (
    UNCERTAIN,
    blank_check,
    row_gate,
)
from bonefrac.inference.ensemble import Ensemble, Prediction
from bonefrac.inference.localise import Localisation
from bonefrac.inference.operating_points import DEFAULT_POINT  # noqa: F401 (re-exported)
from bonefrac.inference.runners import default_threads
from bonefrac.utils import display_path, write_csv, write_json

# Prediction also tries files without a suffix: DICOM exports often have none.
PREDICT_SUFFIXES = IMAGE_SUFFIXES | {""}
DEFAULT_BATCH = 8
FORMAT = "bonefrac-predictions/1"


@dataclass
class PredictResult:
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"file", "reason"}


# ------------------------------------------------------------------------------ listing inputs
def path_sort_key(path: str | os.PathLike) -> tuple[str, ...]:
    """The canonical order of predictions: by path components (``a/b/c.jpg`` before ``a/b.jpg``
    is not implied by string order, so compare component-wise)."""
    return Path(path).parts


def collect_inputs(inputs: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()
                   ) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Expand files and folders into ``(path, key)`` pairs, sorted by :func:`path_sort_key`.

    Folders are walked recursively; they contribute files with an image or DICOM suffix (or
    none), hidden files and folders are skipped, symlinked folders are not followed (no loops)
    and folders under ``exclude`` (e.g. the output folder) are left out. A file listed twice
    (directly and via its folder) counts once. ``key`` identifies the file independently of
    where the data is mounted: its path relative to the folder given on the command line, or its
    name for a file given directly (see :func:`shard_index`).

    Returns (pairs, errors for inputs that do not exist).
    """
    skip = {os.path.realpath(e) for e in exclude}
    found: dict[str, tuple[Path, str]] = {}
    errors = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            for root, dirs, names in os.walk(p, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and os.path.realpath(os.path.join(root, d)) not in skip)
                for n in names:
                    f = Path(root) / n
                    if f.suffix.lower() in PREDICT_SUFFIXES and not n.startswith("."):
                        found.setdefault(os.path.abspath(f), (f, f.relative_to(p).as_posix()))
        elif p.exists() or p.is_symlink():
            found.setdefault(os.path.abspath(p), (p, p.name))
        else:
            errors.append({"file": display_path(p), "reason": "no such file or folder"})
    return sorted(found.values(), key=lambda fk: path_sort_key(fk[0])), errors


def list_inputs(inputs: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()
                ) -> tuple[list[Path], list[dict]]:
    """:func:`collect_inputs` without the keys: (files, errors for missing inputs)."""
    pairs, errors = collect_inputs(inputs, exclude)
    return [f for f, _ in pairs], errors


def shard_index(key: str, n: int) -> int:
    """Which of ``n`` shards (0-based) a file belongs to: sha1 of its key, modulo ``n``.

    The key is the file's path relative to the input folder (see :func:`collect_inputs`), so
    the split is the same on every machine, whatever the folder's absolute mount point.
    """
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % n


def select_shard(pairs: Sequence[tuple[Path, str]], k: int, n: int) -> list[Path]:
    """The files of shard ``k`` of ``n`` (1-based ``k``), in their original order."""
    if not 1 <= k <= n:
        raise InputError(f"shard {k}/{n}: K must be between 1 and N")
    return [f for f, key in pairs if shard_index(key, n) == k - 1]


# ------------------------------------------------------------------------------------ batches
# The domain gate's file checks (size, colour thumbnail, DICOM header) parse the file, so they
# run in the decode worker beside the decoder, never in this process.
FILE_CHECKS = "bonefrac.inference.domain:file_checks"


def decoded_warning(d: Decoded, size: int) -> str:
    """The domain gate's cheap checks (:func:`bonefrac.inference.domain.cheap_checks`) for a
    file decoded by :func:`_decode`: the worker's file checks (``d.notes``) and the blank check
    on the model input of ``size``."""
    return "; ".join(filter(None, [d.notes, blank_check(d.inputs[size])]))


def _decode(path: Path, sizes: Sequence[int], resize: str, *,
            display: bool = False, pool: DecodePool | None = None
            ) -> tuple[Decoded | None, str]:
    """``(Decoded, '')`` or ``(None, reason)``; never raises. The file is decoded (with the
    display image when ``display``) and checked in ``pool``, default the process's decode
    pool (:mod:`bonefrac.data.isolation`): a decoder that crashes, hangs or runs out of
    memory costs this file only."""
    try:
        return decode_file(path, sizes, display=display, resize=resize, checks=FILE_CHECKS,
                           pool=pool), ""
    except ImageReadError as e:
        return None, e.reason
    except Exception as e:  # a bug here (not in the file) must not cost other files their rows
        return None, f"internal error while decoding ({type(e).__name__}: {e})"


def predict_batch(ens: Ensemble, paths: Sequence[Path], *, explain: bool = False,
                  heatmap_dir: Path | None = None, point: str | None = None,
                  pool: DecodePool | None = None) -> tuple[list[dict], list[dict]]:
    """Decode (each file once, in ``pool``: see :func:`_decode`), run every member once and
    fuse: (rows, errors).

    ``point``: the operating point whose threshold drives ``decision`` (see
    :func:`decision_threshold`). Thread-safe; rows and errors keep the order of ``paths``.
    """
    sizes = sorted(ens.sizes)
    overlays = explain and heatmap_dir is not None
    ok, decoded, errors = [], [], []
    for f in paths:
        d, reason = _decode(f, sizes, ens.resize, display=overlays, pool=pool)
        if d is None:
            errors.append({"file": display_path(f), "reason": reason})
        else:
            ok.append(f)
            decoded.append(d)
    if not ok:
        return [], errors
    # warnings use the largest input a member saw
    warnings = [decoded_warning(d, sizes[-1]) for d in decoded]
    try:
        rows, pred = predict_decoded(ens, ok, decoded, warnings, point=point)
    except Exception as e:  # report the batch's files, keep the run going
        return [], errors + [{"file": display_path(f), "reason": f"inference failed ({e})"}
                             for f in ok]
    if overlays:
        threshold = decision_threshold(ens, point)
        for i, (f, row) in enumerate(zip(ok, rows, strict=True)):
            _write_overlay(row, f, decoded[i].display, pred.cam[i], heatmap_dir, threshold,
                           ens.box_threshold)
    return rows, errors


def predict_decoded(ens: Ensemble, names: Sequence[str | os.PathLike],
                    decoded: Sequence[Decoded], warnings: Sequence[str] | None = None, *,
                    point: str | None = None, gate: bool | None = None
                    ) -> tuple[list[dict], Prediction]:
    """Predict images already decoded: ``decoded[i].inputs`` holds ``{size: (size, size)
    uint8}`` for every input size of the ensemble (``ens.sizes``, resized as ``ens.resize``
    says; its width and height map a letterbox model's heat map back), ``names[i]`` is the
    ``file`` of its row.

    Runs every member once on the stacked batch, always with the heat map (its peak and box
    are columns of every row), and returns ``(rows, prediction)``: one :func:`make_row` row per
    image, in order, and the raw :class:`Prediction` (``cam`` for overlays). Used by the CLI
    (through :func:`predict_batch`), the REST server and the Python API. Raises what
    ``Ensemble.predict_gray`` raises.

    ``warnings[i]``: the cheap checks' notes (:func:`decoded_warning`); with the learned check's
    note they form the row's ``warning``, and a row with any makes ``decision`` "uncertain"
    unless ``gate`` is False (None: ``ens.gate_enabled``, off with ``--no-gate``).
    """
    if not decoded:
        raise InputError("no images to predict")
    warnings = list(warnings) if warnings is not None else [""] * len(decoded)
    gray = {s: np.stack([d.inputs[s] for d in decoded]) for s in sorted(ens.sizes)}
    pred = ens.predict_gray(gray, explain=True,
                            aspect=np.array([d.width / d.height for d in decoded]))
    gate = ens.gate_enabled if gate is None else gate
    scores = pred.domain_score
    rows = [make_row(ens, Path(name), pred.prob[i],
                     {k: v[i] for k, v in pred.member_probs.items()},
                     warning=warnings[i], loc=loc_fields(pred.loc, i), point=point,
                     domain_score=None if scores is None else float(scores[i]), gate=gate,
                     detections=None if pred.detections is None else pred.detections[i])
            for i, name in enumerate(names)]
    return rows, pred


def _write_overlay(row: dict, f: Path, full: np.ndarray, cam: np.ndarray, heatmap_dir: Path,
                   threshold: float, box_threshold: float) -> None:
    """The overlay PNG of ``f`` drawn on ``full``, the ``(H, W)`` uint8 image at its own size
    (decoded with the model inputs), with the row's shown boxes; its path (or why not) goes
    into ``row``."""
    from bonefrac.inference.heatmap import save_overlay

    try:
        row["heatmap"] = str(save_overlay(
            full, cam, heatmap_dir, f, prob=row["prob_fractured"], threshold=threshold,
            decision=row["decision"], boxes=shown_detections(row, box_threshold),
            peak=[row["peak_x"], row["peak_y"]]))
    except OSError as e:  # e.g. disk full: the prediction itself is good
        row["heatmap"] = ""
        row["warning"] = "; ".join(filter(None, [row["warning"], f"heat map not written ({e})"]))


def iter_predictions(ens: Ensemble, files: Sequence[Path], *, batch_size: int = DEFAULT_BATCH,
                     workers: int | None = None, explain: bool = False,
                     heatmap_dir: Path | None = None, point: str | None = None,
                     pool: DecodePool | None = None
                     ) -> Iterator[tuple[int, list[dict], list[dict]]]:
    """Yield ``(n_files, rows, errors)`` per batch, in file order, as batches complete.

    ``workers`` batches run at once (default: one per CPU); a few more are queued so that no
    thread waits. Closing the iterator early (an interrupt) cancels the queued batches and
    waits for the running ones (at most ``workers`` batches, well under a second). ``pool``:
    the decode pool (default: the process's, :func:`bonefrac.data.isolation.default_pool`).
    """
    if batch_size < 1:
        raise InputError("batch size must be >= 1")
    workers = max(1, workers or default_threads())
    batches = iter([files[i:i + batch_size] for i in range(0, len(files), batch_size)])
    ex = ThreadPoolExecutor(workers, thread_name_prefix="bonefrac-predict")
    pending: deque[tuple[int, Future]] = deque()

    def submit() -> None:
        b = next(batches, None)
        if b is not None:
            pending.append((len(b), ex.submit(predict_batch, ens, b, explain=explain,
                                              heatmap_dir=heatmap_dir, point=point,
                                              pool=pool)))

    try:
        for _ in range(2 * workers):
            submit()
        while pending:
            n, fut = pending.popleft()
            rows, errors = fut.result()
            submit()
            yield n, rows, errors
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def predict_files(ens: Ensemble, files: Sequence[Path], *, batch_size: int = DEFAULT_BATCH,
                  explain: bool = False, heatmap_dir: Path | None = None,
                  progress: bool = True, workers: int | None = None,
                  on_batch=None, point: str | None = None,
                  pool: DecodePool | None = None) -> PredictResult:
    """Predict every file; unreadable files become error rows, never exceptions.

    ``on_batch(result)`` is called after each batch with the results so far (for checkpoints).
    """
    res = PredictResult()
    with progress_bar(len(files), progress) as bar:
        for n, rows, errors in iter_predictions(ens, files, batch_size=batch_size,
                                                workers=workers, explain=explain,
                                                heatmap_dir=heatmap_dir, point=point,
                                                pool=pool):
            res.rows += rows
            res.errors += errors
            if on_batch:
                on_batch(res)
            bar.update(n)
    return res


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int, enabled: bool = True):
    """A tqdm bar on stderr; none for a single file (importing tqdm costs ~0.1 s of a cold
    one-image prediction, and a bar for one image says nothing)."""
    if not enabled or total <= 1:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="predicting", unit="img", dynamic_ncols=True)


# --------------------------------------------------------------------------------- outputs
PEAK_COLUMNS = ("peak_x", "peak_y")


def loc_fields(loc: Localisation, i: int) -> dict[str, float]:
    """Image ``i``'s peak and box (fractions of the original image's width/height) and score."""
    vals = [*loc.peak[i], *loc.box[i], loc.score[i]]
    return {k: round(float(v), 4) for k, v in zip(PEAK_COLUMNS + BOX_COLUMNS, vals,
                                                   strict=True)}


def operating_point_names(ens: Ensemble) -> tuple[str, ...]:
    """The values ``point`` may take (:attr:`OperatingPoints.names`)."""
    return ens.points.names


def decision_threshold(ens: Ensemble, point: str | None = None) -> float:
    """The threshold that drives ``decision`` (:meth:`OperatingPoints.threshold`).

    Raises:
        UnknownOperatingPoint: (a ValueError) the model has no operating point of that name.
    """
    return ens.points.threshold(point)


def decision_confidence(prob: float, fractured: bool, uncertain: bool = False) -> float | None:
    """P(the decision is right) for a calibrated ``prob``: ``prob`` when the decision is
    fractured, ``1 - prob`` when not, None when it is ``uncertain`` (no decision stated)."""
    if uncertain:
        return None
    return round(float(prob if fractured else 1 - prob), 6)


def make_row(ens: Ensemble, path: Path, prob: float, member_probs: dict[str, float],
             warning: str = "", loc: dict[str, float] | None = None,
             point: str | None = None, domain_score: float | None = None,
             gate: bool = True,
             detections: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """One output row (the columns of ``predictions.csv``, in order):

    - ``file``; ``prob_fractured``: the fused, calibrated P(fractured); ``prob_<member>``: each
      member's calibrated P(fractured);
    - ``decision``: ``fractured`` or ``non_fractured`` at ``threshold``, the threshold of the
      chosen operating point (``point``; the model's default threshold when None);
    - ``confidence``: the calibrated probability that ``decision`` is right: ``p`` for
      ``fractured``, ``1 - p`` for ``non_fractured``, None for ``uncertain`` (at a low triage
      threshold a ``fractured`` row may read confidence 0.22: flagged although a fracture is
      the less likely answer);
    - ``decision_<name>``: the decision at each named operating point;
    - ``peak_x``, ``peak_y``, ``box_x0`` .. ``box_y1``, ``box_score``: where the heat map peaks
      (``loc``, from :func:`loc_fields`);
    - ``domain_score``: the learned domain check (how far the image's features lie from the
      training split's, over the limit met by 0.5% of validation images; > 1: outside the
      training distribution; None without a gate); ``model_id``, ``version``;
    - ``warning``: the cheap checks' notes (``warning``) and the learned check's, '; '-joined.
      Any note makes ``decision`` "uncertain" when ``gate`` is on; ``decision_<name>`` keep
      the model's answer at each point.
    """
    threshold = ens.points.threshold(point)
    decision = bool(ens.points.decide(prob, point))
    warning = row_gate([warning], domain_score)
    row = {"file": display_path(path), "prob_fractured": round(float(prob), 6)}
    row.update({f"prob_{k}": round(float(v), 6) for k, v in member_probs.items()})
    row.update({
        "decision": UNCERTAIN if gate and warning else CLASSES[int(decision)],
        "confidence": decision_confidence(prob, decision, gate and bool(warning)),
        "threshold": round(threshold, 6)})
    for name in ens.points.points:
        row[f"decision_{name}"] = CLASSES[int(ens.points.decide(prob, name))]
    row.update(loc or {})
    if detections is not None:  # a detection head: the box columns are its best box
        dets = detection_dicts(*detections)
        row.update(box_columns(dets[0] if dets else None))
    else:  # the heat map's box is the model's only one
        dets = [map_detection(row)] if loc else []
    row["domain_score"] = None if domain_score is None else round(float(domain_score), 4)
    row.update({"model_id": ens.model_id, "version": __version__, "warning": warning,
                "detections": dets})
    return row


def model_fingerprint(ens: Ensemble) -> str:
    """sha256 over what determines the outputs: member files, temperatures, fusion weights,
    thresholds and the domain gate (its file, whether it is used and whether it decides). Two
    runs with the same fingerprint give the same rows (``--resume``, merging)."""
    keys = ("name", "onnx_sha256", "weights_sha256", "temperature", "fusion_weight")
    spec = {"members": [{k: m.get(k) for k in keys} for m in ens.meta["members"]],
            "threshold": ens.threshold, "operating_points": ens.points.named_thresholds()}
    if ens.meta.get("domain_gate"):  # models without a gate keep their fingerprint
        spec["domain_gate"] = [ens.meta["domain_gate"].get("sha256"), ens.gate is not None,
                               ens.gate_enabled]
    elif not ens.gate_enabled:
        spec["domain_gate"] = [None, False, False]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def gate_info(ens: Ensemble) -> dict:
    """The ``domain_gate`` entry of the predictions header: whether the learned check ran,
    whether flags decide ("uncertain"), and why the learned check is off if it is."""
    return {"learned_check": ens.gate is not None, "decides": ens.gate_enabled,
            "note": ens.gate_note or ("" if ens.gate_enabled else
                                      "--no-gate: flags are warnings only")}


def model_info(ens: Ensemble, point: str | None = None) -> dict:
    """The header of ``predictions.json``: which model made the predictions, and which
    operating point drove ``decision`` (``operating_point``, ``decision_threshold``)."""
    return {"model_id": ens.model_id, "model_fingerprint": model_fingerprint(ens),
            "version": __version__, "threshold": ens.threshold,
            "operating_points": ens.points.named_thresholds(),
            "fusion_weights": ens.weights, "operating_point": ens.points.check(point),
            "decision_threshold": ens.points.threshold(point), "domain_gate": gate_info(ens)}


def write_outputs(out: Path, res: PredictResult, model: Ensemble | dict, *, complete: bool = True,
                  **extra) -> None:
    """``predictions.csv``, its column guide ``predictions.schema.json``
    (:mod:`bonefrac.inference.columns`), ``predictions.json`` and ``errors.csv``, each written
    atomically.

    ``model``: the ensemble, or a :func:`model_info` header (merging shards needs no model).
    ``complete=False`` marks a checkpoint of an unfinished run; ``extra`` goes into the JSON.
    """
    info = model_info(model) if isinstance(model, Ensemble) else model
    fields = ([k for k in res.rows[0] if k != "detections"] if res.rows
              else ["file", "prob_fractured", "decision"])
    write_csv(out / "predictions.csv", fields, res.rows)
    write_schema(out, fields)  # the column guide beside the CSV
    write_csv(out / "errors.csv", ["file", "reason"], res.errors)
    write_csv(out / "detections.csv", DETECTION_COLUMNS, detection_rows(res.rows))
    # The JSON last: a reader (``--resume``, merging) trusts it only once it is complete.
    write_json(out / "predictions.json", {
        "format": FORMAT, **info, "disclaimer": DISCLAIMER, "complete": complete, **extra,
        "n_ok": len(res.rows), "n_failed": len(res.errors),
        "predictions": res.rows, "errors": res.errors})


def read_predictions(out: str | os.PathLike) -> dict:
    """Load ``OUT/predictions.json`` written by :func:`write_outputs`.

    Raises:
        ValueError: missing, unreadable or not a bonefrac predictions file (one clear line).
    """
    path = Path(out) / "predictions.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or \
            not isinstance(data.get("predictions"), list):
        raise InputError(f"{path}: not a bonefrac predictions file ({FORMAT})")
    return data
