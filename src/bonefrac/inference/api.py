"""The Python API: ``bonefrac.load(name_or_folder).predict(path | array | list)`` (no torch).

    import bonefrac
    model = bonefrac.load("ensemble")              # or "baseline", a model folder, a run
    r = model.predict("scan.jpg")                  # one Result; a list in -> a list out
    r.prob_fractured, r.decision, r.decision_triage, r.prob_members["mobilenetv2"]
    r = model.predict(array, explain=True)         # (H, W) uint8, uint16 or float in [0, 1]
    r.heatmap                                      # (H, W) float32 map in [0, 1]
    r.save_overlay("scan_overlay.png")             # the CLI's --explain figure
    rs = model.predict(paths, errors="return")     # a bad file -> Failure, the rest predicted

The numbers are the CLI's: decoding, batching and rows are those of ``bonefrac predict``
(:func:`bonefrac.inference.predict.predict_decoded`), so ``r.prob_fractured`` equals the
``prob_fractured`` column of ``predictions.csv`` for the same file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from bonefrac import InputError
from bonefrac.data.io import Decoded, ImageReadError, gray_from_array
from bonefrac.data.isolation import decode_file
from bonefrac.inference.domain import array_checks
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.heatmap import upsample_map
from bonefrac.inference.predict import (
    DEFAULT_BATCH,
    FILE_CHECKS,
    decoded_warning,
    predict_decoded,
)
from bonefrac.utils import atomic_write, display_path

ImageLike = str | os.PathLike | np.ndarray


@dataclass(frozen=True)
class Result:
    """One image's prediction. Field names are the ``predictions.csv`` columns, except the
    per-member probabilities: member names vary between models, so the ``prob_<member>``
    columns are gathered in the dict ``prob_members`` (``{"mobilenetv2": 0.41, ...}``);
    :meth:`row` gives the exact CSV row back.

    - ``file``: the path as given (``array[i]`` for arrays, ``i`` its position in the input);
    - ``prob_fractured``: fused, calibrated P(fractured), rounded to 6 decimals as in the CSV;
    - ``decision``: ``"fractured"`` / ``"non_fractured"`` at ``threshold``, the threshold of
      the chosen operating point (``predict(..., operating_point=...)``, default the model's);
    - ``confidence``: the calibrated probability that ``decision`` is right
      (``prob_fractured`` for fractured, ``1 - prob_fractured`` for non_fractured, None for
      uncertain);
    - ``decision_triage``, ``decision_confirmation``: the decision at each named operating
      point (None where the model has no such point);
    - ``peak_x``, ``peak_y``, ``box_x0`` .. ``box_y1``: where the heat map peaks and the box
      around it, fractions of the image's width/height; ``box_score`` the box's score;
    - ``domain_score``: the input-domain gate's learned check, > 1 outside the training
      distribution (None where the model has no gate);
    - ``model_id``, ``version``, ``warning`` (why the gate flagged the image: colour, small,
      blank, aspect, DICOM modality/body part, outside the training distribution; '' when
      none). A flagged image has ``decision == "uncertain"`` unless ``predict(gate=False)``;
    - ``detections``: the scored boxes, best first (``rank``, ``score``, ``x0`` .. ``y1`` as
      fractions of the image; the rows of ``detections.csv``); the box columns are rank 1.
      Those to show are :func:`bonefrac.inference.detections.shown_detections` with the
      model's ``box_threshold`` (none unless the decision is fractured);
    - ``heatmap``: with ``explain=True``, the fused map at the image's own size (the input
      array's shape; for a file, as ``load_gray(path, None)`` decodes it), float32 in [0, 1];
      else None; ``image``: with ``explain=True``, the grayscale image the overlay is drawn
      on (``(H, W)`` uint8), else None; :meth:`save_overlay` writes the figure.
    """

    file: str
    prob_fractured: float
    prob_members: dict[str, float]
    decision: str
    confidence: float | None
    threshold: float
    decision_triage: str | None
    decision_confirmation: str | None
    peak_x: float
    peak_y: float
    box_x0: float
    box_y0: float
    box_x1: float
    box_y1: float
    box_score: float
    domain_score: float | None
    model_id: str
    version: str
    warning: str
    detections: tuple[dict, ...] = ()
    heatmap: np.ndarray | None = field(default=None, compare=False, repr=False)
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    box_threshold: float = field(default=0.0, compare=False, repr=False)
    ok = True  # a Result, not a Failure (predict(..., errors="return"))

    @classmethod
    def from_row(cls, row: dict, heatmap: np.ndarray | None = None,
                 image: np.ndarray | None = None, box_threshold: float = 0.0) -> Result:
        """A :func:`bonefrac.inference.predict.make_row` row as a Result."""
        members = {k[len("prob_"):]: v for k, v in row.items()
                   if k.startswith("prob_") and k != "prob_fractured"}
        names = {f.name for f in fields(cls)} - {"prob_members", "heatmap", "detections",
                                                 "image", "box_threshold"}
        return cls(**{k: row.get(k) for k in names}, prob_members=members, heatmap=heatmap,
                   detections=tuple(row.get("detections") or ()), image=image,
                   box_threshold=box_threshold)

    def save_overlay(self, path: str | os.PathLike) -> Path:
        """Write the overlay figure ``bonefrac predict --explain`` writes (the image, the map,
        the shown boxes, the peak, a colour bar and the caption) to ``path`` as PNG,
        atomically; return the path. Needs ``predict(..., explain=True)``."""
        from bonefrac.inference.detections import shown_detections
        from bonefrac.inference.heatmap import heatmap_png

        if self.heatmap is None or self.image is None:
            raise InputError(f"{self.file}: no heat map to draw; predict with explain=True")
        boxes = shown_detections({"decision": self.decision, "detections": self.detections},
                                 self.box_threshold)
        png = heatmap_png(self.image, self.heatmap, prob=self.prob_fractured,
                          threshold=self.threshold, decision=self.decision, boxes=boxes,
                          peak=(self.peak_x, self.peak_y))
        path = Path(path)
        with atomic_write(path, "wb") as f:
            f.write(png)
        return path

    def row(self) -> dict:
        """The ``predictions.csv`` row (same columns, same order)."""
        out = {"file": self.file, "prob_fractured": self.prob_fractured}
        out.update({f"prob_{k}": v for k, v in self.prob_members.items()})
        out.update(decision=self.decision, confidence=self.confidence, threshold=self.threshold)
        for name in ("triage", "confirmation"):
            if getattr(self, f"decision_{name}") is not None:
                out[f"decision_{name}"] = getattr(self, f"decision_{name}")
        for k in ("peak_x", "peak_y", "box_x0", "box_y0", "box_x1", "box_y1", "box_score",
                  "domain_score", "model_id", "version", "warning"):
            out[k] = getattr(self, k)
        return out


@dataclass(frozen=True)
class Failure:
    """An input that could not be predicted (``predict(..., errors="return")``): ``file`` as
    a Result would name it, ``reason`` the one-line why (as in ``errors.csv``)."""

    file: str
    reason: str
    ok = False


class Model:
    """A loaded bonefrac model (ensemble or single run) with a :meth:`predict` for Python."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble

    def __repr__(self) -> str:
        return (f"bonefrac.Model({self.model_id!r}, members={self.member_names}, "
                f"threshold={self.threshold:.4f})")

    @property
    def model_id(self) -> str:
        return self.ensemble.model_id

    @property
    def root(self) -> Path:
        """The model folder."""
        return self.ensemble.root

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.ensemble.members]

    @property
    def threshold(self) -> float:
        """The model's default decision threshold on P(fractured)."""
        return self.ensemble.threshold

    @property
    def box_threshold(self) -> float:
        """The detection score a box needs to be shown (0: every box of a fractured image)."""
        return self.ensemble.box_threshold

    @property
    def operating_points(self) -> dict[str, float]:
        """``{"default": t, "triage": t, "confirmation": t}``: the ``operating_point`` values."""
        return self.ensemble.points.thresholds()

    @property
    def gate_note(self) -> str:
        """'' when the input-domain gate's learned check is on, else why it is off."""
        return self.ensemble.gate_note

    def predict(self, x: ImageLike | Sequence[ImageLike], *, explain: bool = False,
                operating_point: str | None = None, batch_size: int = DEFAULT_BATCH,
                gate: bool = True, window: tuple[float, float] | None = None,
                errors: str = "raise") -> Result | list[Result | Failure]:
        """Predict one image or several.

        Args:
            x: a path (image or DICOM file), a ``(H, W)`` numpy array, or a list of these;
                one input gives one :class:`Result`, a list a list of them, in order. Arrays:
                uint8 (0..255), float (0..1), or integers such as ``pydicom``'s
                ``pixel_array`` (uint16), windowed to 8 bits by :func:`window_to_uint8`.
            window: ``(center, width)`` for integer arrays, as DICOM's WindowCenter /
                WindowWidth (linear, PS3.3 C.11.2.1.2); default: the range of the bits the
                values fill, as bonefrac reads a DICOM file without a window.
            errors: ``"raise"``: the first input that cannot be read raises; ``"return"``
                (lists): it becomes a :class:`Failure` in its place and the others are
                predicted.
            explain: also return the heat map (``Result.heatmap``).
            operating_point: ``"default"`` (the model's threshold, also None), ``"triage"``
                or ``"confirmation"``: whose threshold drives ``decision``.
            batch_size: images per model run.
            gate: False keeps the model's decision for flagged images (the CLI's
                ``--no-gate``); they still carry ``domain_score`` and ``warning``.
        Raises:
            ImageReadError: a file cannot be read (``.reason`` says why).
            ValueError: an array of the wrong shape or dtype; ``UnknownOperatingPoint`` (a
                ValueError) for an operating point the model does not have.
        """
        self.ensemble.points.check(operating_point)
        if errors not in ("raise", "return"):
            raise InputError(f"errors must be 'raise' or 'return', not {errors!r}")
        single = isinstance(x, str | os.PathLike | np.ndarray)
        items = [x] if single else list(x)
        if batch_size < 1:
            raise InputError("batch_size must be >= 1")
        out: list[Result | Failure] = []
        for i in range(0, len(items), batch_size):
            out += self._predict_batch(items[i:i + batch_size], i, explain, operating_point,
                                       gate, window, errors == "raise")
        return out[0] if single else out

    def _predict_batch(self, items: list[ImageLike], start: int, explain: bool,
                       point: str | None, gate: bool, window: tuple[float, float] | None,
                       strict: bool) -> list[Result | Failure]:
        """One batch in order; an item that cannot be read raises (``strict``) or becomes a
        :class:`Failure` in its place."""
        sizes, resize = sorted(self.ensemble.sizes), self.ensemble.resize
        out: list[Result | Failure | None] = []
        names, decoded, warnings = [], [], []
        for j, item in enumerate(items):
            try:
                name, d, warning = _decode_item(item, start + j, sizes, resize, explain, window)
            except (ImageReadError, InputError) as e:
                if strict:
                    raise
                out.append(Failure(_item_name(item, start + j), getattr(e, "reason", str(e))))
                continue
            out.append(None)
            names.append(name)
            decoded.append(d)
            warnings.append(warning)
        if not decoded:
            return out
        rows, pred = predict_decoded(self.ensemble, names, decoded, warnings, point=point,
                                     gate=gate)
        done = iter(self._result(row, d, pred.cam[j], explain)
                    for j, (d, row) in enumerate(zip(decoded, rows, strict=True)))
        return [r if r is not None else next(done) for r in out]

    def _result(self, row: dict, d: Decoded, cam: np.ndarray, explain: bool) -> Result:
        if not explain:
            return Result.from_row(row)
        image = d.display  # the file's display image, or the array itself
        h, w = image.shape
        heat = upsample_map(cam, (w, h)).astype(np.float32)
        return Result.from_row(row, heat, image, self.box_threshold)


def window_to_uint8(a: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """An integer ``(H, W)`` array (e.g. a DICOM ``pixel_array``, uint16) -> uint8 0..255.

    With ``window = (center, width)``: DICOM's linear VOI window (PS3.3 C.11.2.1.2), values
    below it black, above it white. Without: unsigned values scaled from 0 .. 2**bits - 1,
    ``bits`` the bits they fill (12 when the maximum is below 4096, as most 12-bit radiographs
    stored in 16 bits; never fewer than 8), as bonefrac reads a DICOM file without a window.
    The values are used as stored: apply a modality rescale or invert MONOCHROME1 first.
    uint8 and float arrays pass through unchanged (see ``gray_from_array``).
    """
    if a.dtype == np.uint8 or not np.issubdtype(a.dtype, np.integer):
        return a
    v = a.astype(np.float64)
    if window is not None:
        c, w = (float(x) for x in window)
        if not w >= 1:
            raise InputError(f"window width must be >= 1, got {w:g}")
        out = np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    elif np.issubdtype(a.dtype, np.signedinteger) and a.size and a.min() < 0:
        raise InputError(f"a signed {a.dtype} array with negative values needs "
                         "window=(center, width)")
    else:
        used = max(8, int(a.max()).bit_length() if a.size else 8)
        bits = used if used <= 12 else a.dtype.itemsize * 8
        out = v / float(2 ** bits - 1)
    return np.round(out * 255.0).astype(np.uint8)


def _item_name(item: object, index: int) -> str:
    """The ``file`` a row of ``item`` gets: its path, or ``array[index]``."""
    return display_path(Path(item)) if isinstance(item, str | os.PathLike) else f"array[{index}]"


def _decode_item(item: ImageLike, index: int, sizes: Sequence[int], resize: str,
                 display: bool = False, window: tuple[float, float] | None = None
                 ) -> tuple[str, Decoded, str]:
    """(file name for the row, the decoded item, warning) for a path or an array.

    A file is decoded in the isolated decode pool, as ``bonefrac predict`` decodes it (with
    the display image when ``display``); an array in this process (it is pixels already;
    integer arrays windowed by :func:`window_to_uint8`). Raises ``ImageReadError`` for a file
    that cannot be used, ``InputError`` for a bad array.
    """
    if isinstance(item, np.ndarray):
        if item.ndim != 2:
            raise InputError(f"input {index}: expected a (H, W) grayscale array, got shape "
                             f"{item.shape}")
        item = window_to_uint8(item, window)
        inputs = {s: gray_from_array(item, s, resize) for s in sizes}  # validates floats too
        h, w = item.shape[:2]
        shown = None  # the overlay's image: the array itself, at its own size
        if display:
            shown = item if item.dtype == np.uint8 else np.round(item * 255.0).astype(np.uint8)
        return f"array[{index}]", Decoded(inputs, shown, w, h), \
            array_checks(item, inputs[sizes[-1]])
    if not isinstance(item, str | os.PathLike):
        raise InputError(f"input {index}: expected a path or a numpy array, got "
                         f"{type(item).__name__}")
    path = Path(item)
    d = decode_file(path, sizes, display=display, resize=resize, checks=FILE_CHECKS)
    return display_path(path), d, decoded_warning(d, sizes[-1])


def load(model: str | os.PathLike | None = "ensemble", *, backend: str = "auto",
         threads: int | None = None, verify: bool = True) -> Model:
    """Load a model for :meth:`Model.predict`.

    Args:
        model: ``"ensemble"`` (the shipped default) or ``"baseline"`` (the shipped
            MobileNetV2), an ensemble folder (``ensemble_meta.json``) or a training run
            folder (``model.json``), as the CLI's ``--model``.
        backend: ``"onnx"`` (no torch), ``"torch"`` or ``"auto"`` (ONNX where exported).
        threads: ONNX Runtime threads per run (default: ONNX Runtime's).
        verify: check every member file against its recorded sha256 first.
    Raises:
        ModelFileError: not a model folder, a missing or tampered file.
    """
    return Model(Ensemble.load(model, backend=backend, threads=threads, verify=verify))
