"""The input-domain gate: is this image like the radiographs the model was trained on? (no torch)

Two kinds of check, each turning into a note in the row's ``warning`` and, unless the gate is
switched off (``--no-gate``), ``decision = "uncertain"``:

- cheap checks on the file and the decoded image (:func:`cheap_checks`): a colour image, one
  smaller than :data:`MIN_SIDE` px on its short side, a nearly uniform one, an extreme aspect
  ratio, a DICOM object whose modality is not a plain radiograph (CT, MR, US, ...: flagged, not
  refused) or whose body part is not one the model was trained on (upper limb). Each limit is
  set so that none of the 4,148 reference radiographs trips it.
- a learned check (:class:`DomainGate`) on the image's pooled backbone features (every
  member's): their Mahalanobis distance from the training split's inside the top principal
  components (shrunk, Ledoit-Wolf, covariance) and how much of them lies outside those
  components (relative residual norm). ``domain_score`` is the larger of the two, each divided
  by the 99.5th percentile of the validation split's, so > 1 means "outside the training
  distribution" (about 1% of validation images are above either limit). Fitted by
  :mod:`bonefrac.evaluation.domain_fit` at ``bonefrac ensemble fit`` and stored beside the
  model as ``domain_gate.npz`` (read with ``allow_pickle=False``, sha256 checked like every
  member file).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from bonefrac import InputError
from bonefrac.inference.model_folder import ModelFileError, check_file
from bonefrac.utils import atomic_write

GATE_FORMAT = "bonefrac-domain-gate/1"
GATE_FILE = "domain_gate.npz"
UNCERTAIN = "uncertain"  # the decision of a flagged image (gate on)

# Cheap-check limits. Reference: the 4,148 radiographs of the bone-fracture set, whose short
# side is >= 111 px, aspect ratio <= 4.62, pixel standard deviation >= 12 grey levels, and
# whose (RGB JPEG) files have no coloured pixel at all at COLOUR_LEVEL (measured: 0 of 4,148
# flagged); the colour limits leave room for the chroma noise of re-encoded grey images.
MIN_SIDE = 100  # px, the original image's short side
MAX_ASPECT = 5.0  # long side / short side
BLANK_STD = 4.0  # grey levels, on the model input
COLOUR_LEVEL = 12  # a pixel is coloured when max(R,G,B) - min(R,G,B) exceeds this (0..255)
COLOUR_FRACTION = 0.05  # ... and the image is colour when more than this share of pixels is
COLOUR_THUMB = 128  # px: colour is judged on a thumbnail (JPEG draft mode: cheap)
# DICOM modalities of plain radiographs (PS3.3 C.7.3.1.1.1): computed / digital radiography
# and radiographic imaging (film). Anything else (CT, MR, US, NM, PT, MG, XA, RF, ...) is
# flagged; an object without Modality is not.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "RG"})
# Body parts the training images show (upper limb): DICOM BodyPartExamined values containing
# any of these words pass; other values (CHEST, SKULL, KNEE, ...) are flagged; none passes.
TRAINED_BODY_PARTS = ("ARM", "ELBOW", "FINGER", "HAND", "HUMERUS", "SHOULDER", "WRIST",
                      "THUMB", "UPPER", "EXTREMITY", "CLAVICLE", "SCAPULA", "RADIUS", "ULNA")
OUTSIDE = "outside the training distribution"


# ------------------------------------------------------------------------------- cheap checks
def size_check(w: int, h: int) -> str:
    """'' unless the original ``w`` x ``h`` px image is too small or too elongated."""
    notes = []
    if min(w, h) < MIN_SIDE:
        notes.append(f"image only {w}x{h} px, upscaled (minimum {MIN_SIDE} px on the short "
                     "side)")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        notes.append(f"extreme aspect ratio {max(w, h) / max(1, min(w, h)):.1f}:1 "
                     f"(limit {MAX_ASPECT:g}:1)")
    return "; ".join(notes)


def blank_check(gray: np.ndarray) -> str:
    """'' unless the decoded model input ``(S, S)`` uint8 is nearly uniform."""
    return "nearly uniform image (blank?)" if float(gray.std()) < BLANK_STD else ""


def colour_check(rgb: np.ndarray) -> str:
    """'' unless ``rgb`` ``(H, W, 3)`` uint8 is a colour image rather than a grey one."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # per channel: 3x faster than max(axis=2)
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    share = float(np.count_nonzero(chroma > COLOUR_LEVEL)) / max(1, chroma.size)
    if share > COLOUR_FRACTION:
        return f"colour image ({share:.0%} of pixels coloured), not a grey radiograph"
    return ""


def file_checks(path: str | os.PathLike) -> str:
    """Size, aspect and colour of an image file (header + a thumbnail), or the DICOM
    checks (:func:`dicom_checks`); '' when nothing is odd or the file cannot be read this way
    (the decoder then names the problem)."""
    from PIL import Image

    from bonefrac.data.io import open_formats

    try:
        with Image.open(path, formats=open_formats()) as im:
            w, h = im.size
            notes = [size_check(w, h)]
            if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                im.draft("RGB", (COLOUR_THUMB, COLOUR_THUMB))  # JPEG: decode at 1/2..1/8
                im.thumbnail((COLOUR_THUMB, COLOUR_THUMB), Image.NEAREST)  # a share: no filter
                notes.append(colour_check(np.asarray(im.convert("RGB"))))
        return "; ".join(filter(None, notes))
    except Exception:  # not a Pillow format: DICOM, or a file the decoder will refuse
        return dicom_checks(path)


def dicom_checks(path: str | os.PathLike) -> str:
    """Modality, body part, size and aspect from a DICOM header; '' for non-DICOM files or
    when pydicom is missing (decoding then says so)."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return ""
    notes = []
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        notes.append(f"DICOM modality {modality} is not a plain radiograph (flagged, not "
                     f"refused; plain radiographs are {'/'.join(sorted(RADIOGRAPH_MODALITIES))})")
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part and not any(word in part for word in TRAINED_BODY_PARTS):
        notes.append(f"body part {part} is not one the model was trained on (upper limb)")
    if ds.get("Rows") and ds.get("Columns"):
        notes.append(size_check(int(ds.Columns), int(ds.Rows)))
    return "; ".join(filter(None, notes))


def cheap_checks(path: str | os.PathLike, gray: np.ndarray) -> str:
    """Every cheap check on one file and its decoded model input ``(S, S)`` uint8:
    '; '-joined notes, '' when the image looks like a plain grey radiograph."""
    return "; ".join(filter(None, [file_checks(path), blank_check(gray)]))


def array_checks(image: np.ndarray, gray: np.ndarray) -> str:
    """The cheap checks for an in-memory ``(H, W)`` image (no file, no colour, no DICOM)."""
    h, w = image.shape[:2]
    return "; ".join(filter(None, [size_check(w, h), blank_check(gray)]))


# ---------------------------------------------------------------------------- learned check
@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread only. The gate's small
    matmuls are faster so, and a multi-threaded BLAS call leaves worker threads spinning that
    took the CPU from ONNX Runtime and the decoders: v1 end to end 55.8 -> 69.7 images/s on
    2 cores (benchmarks/predict_throughput.py, OPENBLAS_NUM_THREADS=1 against the default)."""
    return _blas().limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class DomainGate:
    """Mahalanobis distance of pooled features from the training split's.

    For each member ``m``: ``mean[m]`` ``(C_m,)`` and ``components[m]`` ``(k_m, C_m)`` (its
    principal axes on the training features); the members' projections are concatenated to
    ``K = sum k_m`` values, whose ``location`` ``(K,)`` and shrunk ``precision`` ``(K, K)``
    give the distance. ``threshold``: the distance at which ``domain_score`` = 1;
    ``residual_threshold``: likewise for the residual (:meth:`measures`).
    """

    members: tuple[str, ...]
    mean: Mapping[str, np.ndarray]
    components: Mapping[str, np.ndarray]
    location: np.ndarray
    precision: np.ndarray
    threshold: float
    residual_threshold: float
    info: Mapping[str, str]  # how it was fitted (JSON text fields), for the model card

    _bases: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (C_m, k_m) float64, contiguous: casting the stored float32 axes on every call cost
        # about half of the gate's time
        object.__setattr__(self, "_bases", {m: np.ascontiguousarray(self.components[m].T,
                                                                     np.float64)
                                            for m in self.members})

    def _centred(self, pooled: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {m: np.asarray(pooled[m], np.float64) - self.mean[m] for m in self.members}

    def _scores(self, x: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Per member, ``(N, k_m)`` principal-component scores of centred features ``x``."""
        return [x[m] @ self._bases[m] for m in self.members]

    def project(self, pooled: Mapping[str, np.ndarray]) -> np.ndarray:
        """``{member: (N, C_m)}`` -> ``(N, K)`` principal-component scores."""
        return np.concatenate(self._scores(self._centred(pooled)), axis=1)

    def measures(self, pooled: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(N,)`` Mahalanobis distances (in standard deviations of the training features) and
        ``(N,)`` residuals: the sum over members of the share of the centred features' norm
        that lies outside the principal components (0: all inside, 1: none). One projection
        serves both."""
        with _one_blas_thread():
            return self._measures(pooled)

    def _measures(self, pooled: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = self._centred(pooled)
        scores = self._scores(x)
        z = np.concatenate(scores, axis=1) - self.location
        dist = np.sqrt(np.maximum(np.einsum("nk,nk->n", z @ self.precision, z), 0.0))
        residual = np.zeros(len(z))
        for m, zm in zip(self.members, scores, strict=True):
            # the axes are orthonormal, so |x - inside|^2 = |x|^2 - |scores|^2
            xx = np.einsum("nc,nc->n", x[m], x[m])
            out = np.sqrt(np.maximum(xx - np.einsum("nk,nk->n", zm, zm), 0.0))
            residual += out / np.maximum(np.sqrt(xx), 1e-12)
        return dist, residual

    def score(self, pooled: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(N,)`` domain scores: max(distance / threshold, residual / residual_threshold);
        > 1 is outside the training distribution."""
        dist, residual = self.measures(pooled)
        return np.maximum(dist / self.threshold, residual / self.residual_threshold)

    # --------------------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> None:
        """Write as ``.npz`` of plain arrays (no object arrays: loads with allow_pickle=False)."""
        arrays = {"format": np.array(GATE_FORMAT), "members": np.array(list(self.members)),
                  "location": self.location, "precision": self.precision,
                  "threshold": np.array(self.threshold),
                  "residual_threshold": np.array(self.residual_threshold),
                  "info_keys": np.array(list(self.info) or [""]),
                  "info_values": np.array(list(self.info.values()) or [""])}
        for i, m in enumerate(self.members):
            arrays[f"mean_{i}"], arrays[f"components_{i}"] = self.mean[m], self.components[m]
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainGate:
        """Read a gate file; :class:`ModelFileError` (naming it) if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != GATE_FORMAT:
                    raise InputError(f"format {z['format']} is not {GATE_FORMAT}")
                members = tuple(str(m) for m in z["members"])
                info = dict(zip(map(str, z["info_keys"]), map(str, z["info_values"]),
                                strict=True))
                gate = cls(members, {m: z[f"mean_{i}"] for i, m in enumerate(members)},
                           {m: z[f"components_{i}"] for i, m in enumerate(members)},
                           z["location"], z["precision"], float(z["threshold"]),
                           float(z["residual_threshold"]), {k: v for k, v in info.items() if k})
        except (OSError, KeyError, ValueError) as e:
            raise ModelFileError(f"{path}: not a bonefrac domain gate ({e})") from None
        k = sum(len(c) for c in gate.components.values())
        if gate.precision.shape != (k, k) or not min(gate.threshold,
                                                     gate.residual_threshold) > 0:
            raise ModelFileError(f"{path}: inconsistent domain gate (K={k}, precision "
                                 f"{gate.precision.shape}, threshold {gate.threshold})")
        return gate


def load_gate(root: Path, meta: Mapping, has_pooled: Mapping[str, bool], verify: bool = True
              ) -> tuple[DomainGate | None, str]:
    """The model's gate and a note on its state: ``(gate, "")`` when it is usable, else
    ``(None, why it is off)``: the model has none, or a member's graph lacks the pooled
    output. A gate file that is missing or tampered with is a :class:`ModelFileError`."""
    spec = meta.get("domain_gate")
    if not spec:
        why = meta.get("domain_gate_skipped") or "it has none"
        return None, (f"domain gate off for model {meta.get('model_id', root.name)}: {why} "
                      "(fit one with `bonefrac ensemble gate`); cheap checks only")
    path = root / spec["file"]
    check_file(path, spec.get("sha256") if verify else None)
    gate = DomainGate.load(path)
    missing = [m for m in gate.members if not has_pooled.get(m, False)]
    if missing:
        return None, (f"domain gate off: member(s) {', '.join(missing)} have no pooled-"
                      "feature output (exported before the gate; re-export with `bonefrac "
                      "export`); cheap checks only")
    return gate, ""


def gate_note(score: float | None) -> str:
    """The warning for a learned-check score ('' when inside the training distribution)."""
    if score is None or not np.isfinite(score) or score <= 1.0:
        return ""
    return f"{OUTSIDE} (domain_score {score:.2f} > 1)"


def row_gate(warnings: Sequence[str], score: float | None) -> str:
    """The row's ``warning``: the cheap-check notes and the learned check's note joined."""
    return "; ".join(filter(None, [*warnings, gate_note(score)]))
