"""A loaded model: one or more members, their calibration, fusion weights and operating points.

Two folder layouts load the same way:
- an ensemble folder with ``ensemble_meta.json`` (members as ONNX and/or safetensors files,
  each checked against the sha256 recorded in the meta before use);
- a training run folder with ``model.json`` + ``model.safetensors`` (one member; needs torch).

Fusion: P = sum_i w_i * sigmoid((z_i1 - z_i0) / T_i), with sum_i w_i = 1 (calibrated members).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonefrac import FRACTURE_MAP, InputError
from bonefrac.data.preprocess import Preprocessing, boxes_from_letterbox
from bonefrac.inference.calibration import calibrated_prob, fuse
from bonefrac.inference.detect import DecodeConfig, decode
from bonefrac.inference.domain import DomainGate, load_gate
from bonefrac.inference.localise import Localisation, from_letterbox, localise, upsample
from bonefrac.inference.model_folder import (
    META_NAME,
    ModelFileError,
    ModelFolder,
    run_meta_as_ensemble,
)
from bonefrac.inference.operating_points import OperatingPoints
from bonefrac.inference.spec import MemberSpec, ModelSpec

# META_NAME, ModelFileError, fuse and run_meta_as_ensemble are re-exported: callers have always
# imported them from this module.
__all__ = ["META_NAME", "Ensemble", "Member", "ModelFileError", "Prediction", "fuse",
           "run_meta_as_ensemble"]


@dataclass
class Member:
    name: str
    arch: str
    preprocessing: Preprocessing
    temperature: float
    weight: float
    spec: MemberSpec  # the member's entry in the model's spec
    runner: object = None  # OnnxRunner or bonefrac.models.torch_runner.TorchRunner

    @property
    def heatmap(self) -> str:
        """What the member's map output is: ``FRACTURE_MAP`` (a trained per-cell P(fracture),
        box-supervised) or ``GRADCAM`` (closed-form Grad-CAM of the fracture logit)."""
        return self.spec.heatmap


@dataclass
class Prediction:
    """Outputs for N images: fused and per-member P(fractured), and optional heat maps.

    ``cam``: ``(N, h, w)`` in [0, 1], the members' maps fused with the fusion weights (a
    supervised fracture map is a per-cell probability and is used as is; a Grad-CAM map is
    scaled to a peak of 1). ``loc``: its peak and box (:mod:`bonefrac.inference.localise`).
    """

    prob: np.ndarray  # (N,)
    member_probs: dict[str, np.ndarray]  # name -> (N,)
    cam: np.ndarray | None = None
    loc: Localisation | None = None
    domain_score: np.ndarray | None = None  # (N,) input-domain gate score, > 1: outside
    # Per image (boxes (K, 4) as fractions of the original image, scores (K,)), best first,
    # from the detection head (with ``explain``); None for a model without one.
    detections: list[tuple[np.ndarray, np.ndarray]] | None = None


class Ensemble:
    """Loaded members and the model's spec; ``points`` is the decision rule
    (:class:`OperatingPoints`), ``meta`` the spec as its JSON dict (read-only)."""

    def __init__(self, members: list[Member], spec: ModelSpec, root: Path):
        self.members = members
        self.spec = spec
        self.meta = spec.to_dict()
        self.root = root
        self.points: OperatingPoints = spec.points
        # The input-domain gate (bonefrac.inference.domain): None with gate_note saying why.
        # gate_enabled False (--no-gate) keeps scores and warnings but not "uncertain".
        self.gate: DomainGate | None = None
        self.gate_note = "domain gate off: not loaded"
        self.gate_enabled = True

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", threads: int | None = None,
             verify: bool = True) -> Ensemble:
        """Load an ensemble folder (``ensemble_meta.json``) or a training run (``model.json``).

        Args:
            backend: ``"onnx"`` (no torch), ``"torch"``, or ``"auto"`` (ONNX where exported).
            verify: check each member file against its recorded sha256 before loading it.
        Raises:
            ModelFileError: missing meta or member file, checksum mismatch, unreadable model.
        """
        folder = ModelFolder.open(path)
        members = [_load_member(folder, spec, backend, threads, verify)
                   for spec in folder.spec.members]
        ens = cls(members, folder.spec, folder.root)
        fuse({m.name: np.zeros(1) for m in members}, ens.weights)  # validates the weights
        ens.gate, ens.gate_note = load_gate(
            folder.root, folder.meta,
            {m.name: bool(getattr(m.runner, "has_pooled", False)) for m in members}, verify)
        if sum(bool(m.spec.detector) for m in members) > 1:
            raise ModelFileError(f"{folder.root}: more than one member has a detection head")
        if len({m.preprocessing.resize for m in members}) > 1:  # one decode per size
            raise ModelFileError(f"{folder.root}: members mix stretch and letterbox resizing")
        return ens

    @property
    def threshold(self) -> float:
        """The default decision threshold (``points.default``)."""
        return self.points.default

    @threshold.setter
    def threshold(self, value: float) -> None:  # an evaluation that re-tunes it on its data
        self.points = self.points.replace_default(value)

    @property
    def operating_points(self) -> dict[str, dict]:
        """The named points as the meta stores them (``points`` is the decision rule)."""
        return {k: p.to_dict() for k, p in self.points.points.items()}

    @property
    def detector(self) -> Member | None:
        """The member with a detection head (a model has at most one), or None."""
        return next((m for m in self.members if m.spec.detector), None)

    @property
    def box_threshold(self) -> float:
        """The detection score a box needs to be shown (chosen on validation; 0: all)."""
        return float(self.spec.box_threshold or 0.0)

    @property
    def weights(self) -> dict[str, float]:
        return {m.name: m.weight for m in self.members}

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def sizes(self) -> set[int]:
        return {m.preprocessing.size for m in self.members}

    @property
    def resize(self) -> str:
        """How every member's input square is made: ``stretch`` or ``letterbox``."""
        return self.members[0].preprocessing.resize

    # -------------------------------------------------------------- prediction
    def member_logits(self, gray: Mapping[int, np.ndarray], want_cam: bool = False
                      ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Raw logits (and CAMs) per member for decoded images ``{size: (N, size, size) uint8}``."""
        return {m.name: m.runner.run(m.preprocessing(gray[m.preprocessing.size]), want_cam)
                for m in self.members}

    def member_outputs(self, gray: Mapping[int, np.ndarray], want_cam: bool = False,
                       want_pooled: bool = False, det_out: dict[str, np.ndarray] | None = None
                       ) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """:meth:`member_logits` plus each member's pooled features ``(N, C)`` (None where
        not asked for or the runner has none), from one run per member. With ``det_out``,
        the detection member's raw output ``(N, L, 6)`` goes into it, from the same run."""
        out = {}
        for m in self.members:
            x = m.preprocessing(gray[m.preprocessing.size])
            if det_out is not None and m.spec.detector:
                r = m.runner.run_det(x)
                det_out[m.name] = r["det"]
                out[m.name] = (r["logits"], r["cam"] if want_cam else None,
                               r["pooled"] if want_pooled else None)
            elif want_pooled and getattr(m.runner, "has_pooled", False):
                out[m.name] = m.runner.run_outputs(x, want_cam, True)
            else:
                out[m.name] = (*m.runner.run(x, want_cam), None)
        return out

    def domain_scores(self, pooled: Mapping[str, np.ndarray | None]) -> np.ndarray | None:
        """``(N,)`` gate scores (:meth:`DomainGate.score`), None without a usable gate."""
        if self.gate is None or any(pooled.get(n) is None for n in self.gate.members):
            return None
        return self.gate.score(pooled)

    def predict_gray(self, gray: Mapping[int, np.ndarray] | np.ndarray,
                     explain: bool = False, aspect: np.ndarray | None = None) -> Prediction:
        """Fused prediction for ``{size: (N, size, size) uint8}`` decoded as ``self.resize``
        says (or one ``(N, s, s)`` array for every size).

        ``aspect``: ``(N,)`` width/height of the original images; a letterbox model needs it
        for heat maps (``explain``), which are always returned in the images' own frame.
        """
        if isinstance(gray, np.ndarray):
            gray = {s: gray for s in self.sizes}
        det_raw: dict[str, np.ndarray] | None = {} if explain and self.detector else None
        outs = self.member_outputs(gray, want_cam=explain, want_pooled=self.gate is not None,
                                   det_out=det_raw)
        probs = {m.name: calibrated_prob(outs[m.name][0], m.temperature) for m in self.members}
        prob = fuse(probs, self.weights)
        domain = self.domain_scores({k: v[2] for k, v in outs.items()})
        if not explain:
            return Prediction(prob, probs, domain_score=domain)
        maps = [_member_map(m, outs[m.name][1]) for m in self.members]
        if self.resize == "letterbox":
            if aspect is None:
                raise InputError("a letterbox model's heat maps need the images' aspect ratios")
            maps = [from_letterbox(mp, np.asarray(aspect, np.float64)) for mp in maps]
        hw = max(mp.shape[1:] for mp in maps)  # members of different sizes: the finest grid
        cam = sum(m.weight * _resize_maps(mp, hw) for m, mp in zip(self.members, maps,
                                                                   strict=True))
        supervised = any(m.heatmap == FRACTURE_MAP for m in self.members)
        # The box's score: the fused fracture map's peak where a member has one, else P.
        return Prediction(prob, probs, cam, localise(cam, None if supervised else prob),
                          domain, self._detections(det_raw, aspect) if det_raw else None)

    def _detections(self, raw: dict[str, np.ndarray], aspect: np.ndarray | None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The detection member's raw output decoded (:func:`bonefrac.inference.detect.decode`)
        and brought from its input square to each image's own frame."""
        m = self.detector
        dets = decode(raw[m.name], DecodeConfig.from_spec(m.spec.detector, m.preprocessing.size))
        if m.preprocessing.resize != "letterbox":  # fractions of a stretched square are the image's
            return dets
        return [(boxes_from_letterbox(b, a), s) for (b, s), a in zip(dets, aspect, strict=True)]

    def decide(self, prob: np.ndarray | float, point: str | None = None) -> np.ndarray:
        """True where P(fractured) >= the threshold of ``point`` (:meth:`OperatingPoints.
        decide`)."""
        return self.points.decide(prob, point)


def _member_map(m: Member, cam: np.ndarray) -> np.ndarray:
    return cam if m.heatmap == FRACTURE_MAP else _normalise_cam(cam)


def _resize_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return maps if maps.shape[1:] == hw else np.stack([upsample(mp, hw) for mp in maps])


def _normalise_cam(cam: np.ndarray) -> np.ndarray:
    """Scale each map to [0, 1] (Grad-CAM maps are compared by shape, not magnitude)."""
    hi = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    return np.where(hi > 0, cam / np.where(hi > 0, hi, 1), 0.0)


def _load_member(folder: ModelFolder, spec: MemberSpec, backend: str, threads: int | None,
                 verify: bool) -> Member:
    """One member with its runner: ONNX where asked for (or, with ``auto``, where exported),
    else torch, which a light install lacks: then the message says how to get ONNX."""
    use_onnx = backend == "onnx" or (backend == "auto" and bool(spec.onnx))
    if not use_onnx and importlib.util.find_spec("torch") is None:
        raise ModelFileError(
            f"{folder.root}: member {spec.name} has no ONNX export and torch is not "
            f"installed. Export it once with `bonefrac export --model {folder.root} --out "
            f"{folder.root}` (needs pip install -e '.[train]'), then predict without torch.")
    f = folder.member_file(spec, "onnx" if use_onnx else "weights", verify)
    m = Member(spec.name, spec.arch, spec.preprocessing, spec.temperature, spec.fusion_weight,
               spec)
    try:
        if use_onnx:
            from bonefrac.inference.runners import OnnxRunner

            m.runner = OnnxRunner(f, threads)
        else:  # the torch backend: imported only here, so inference stays torch-free
            from bonefrac.models.torch_runner import TorchRunner

            m.runner = TorchRunner.from_spec(f, spec)
    except ModelFileError:
        raise
    except Exception as e:  # a corrupt file that still matched no checksum
        raise ModelFileError(f"{f}: cannot load model ({type(e).__name__}: {e})") from None
    return m
