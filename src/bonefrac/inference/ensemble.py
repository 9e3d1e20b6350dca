"""A loaded model: one or more members, their calibration, fusion weights and operating points.

Two folder layouts load the same way:
- an ensemble folder with ``ensemble_meta.json`` (members as ONNX and/or safetensors files,
  each checked against the sha256 recorded in the meta before use);
- a training run folder with ``model.json`` + ``model.safetensors`` (one member; needs torch).

Fusion: P = sum_i w_i * sigmoid((z_i1 - z_i0) / T_i), with sum_i w_i = 1 (calibrated members).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonefrac import FRACTURE_MAP, GRADCAM
from bonefrac.data.preprocess import Preprocessing
from bonefrac.evaluation.calibration import calibrated_prob
from bonefrac.inference.localise import Localisation, localise
from bonefrac.utils import sha256_file

META_NAME = "ensemble_meta.json"


class ModelFileError(Exception):
    """A model folder or file that is missing, tampered with or malformed."""


def fuse(member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of members' P(fractured): ``(N,)``. Weights must be >= 0 and sum to 1."""
    w = np.array([weights[k] for k in member_probs], dtype=np.float64)
    if (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"fusion weights must be >= 0 and sum to 1, got {dict(weights)}")
    return sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, member_probs.values(),
                                                               strict=True))


@dataclass
class Member:
    name: str
    arch: str
    preprocessing: Preprocessing
    temperature: float = 1.0
    weight: float = 1.0
    spec: dict = field(default_factory=dict)  # the member's entry in the meta, as stored
    runner: object = None  # OnnxRunner or bonefrac.models.torch_runner.TorchRunner

    @property
    def heatmap(self) -> str:
        """What the member's map output is: ``FRACTURE_MAP`` (a trained per-cell P(fracture),
        box-supervised) or ``GRADCAM`` (closed-form Grad-CAM of the fracture logit)."""
        return self.spec.get("heatmap") or self.spec.get("config", {}).get("heatmap", GRADCAM)


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


class Ensemble:
    def __init__(self, members: list[Member], meta: dict, root: Path):
        self.members = members
        self.meta = meta
        self.root = root
        self.threshold = float(meta["threshold"])
        self.operating_points: dict[str, dict] = meta.get("operating_points", {})

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
        root = Path(path)
        if (root / META_NAME).is_file():
            meta = _read_json(root / META_NAME)
        elif (root / "model.json").is_file():
            meta = run_meta_as_ensemble(root)
        else:
            raise ModelFileError(f"{root}: no {META_NAME} or model.json - not a bonefrac model "
                                 "folder")
        members = []
        for spec in meta["members"]:
            use_onnx = backend == "onnx" or (backend == "auto" and spec.get("onnx"))
            key = "onnx" if use_onnx else "weights"
            if not spec.get(key):
                raise ModelFileError(f"{root}: member {spec['name']} has no {key} file "
                                     f"(export it with `bonefrac export`)")
            f = root / spec[key]
            _check_file(f, spec.get(f"{key}_sha256") if verify else None)
            m = Member(spec["name"], spec["arch"], Preprocessing.from_dict(spec["preprocessing"]),
                       float(spec.get("temperature", 1.0)), float(spec.get("fusion_weight", 1.0)),
                       spec)
            try:
                if use_onnx:
                    from bonefrac.inference.runners import OnnxRunner

                    m.runner = OnnxRunner(f, threads)
                else:
                    from bonefrac.models.torch_runner import TorchRunner

                    m.runner = TorchRunner.from_spec(root, spec)
            except ModelFileError:
                raise
            except Exception as e:  # a corrupt file that still matched no checksum
                raise ModelFileError(f"{f}: cannot load model ({type(e).__name__}: {e})") from None
            members.append(m)
        ens = cls(members, meta, root)
        fuse({m.name: np.zeros(1) for m in members}, ens.weights)  # validates the weights
        return ens

    @property
    def weights(self) -> dict[str, float]:
        return {m.name: m.weight for m in self.members}

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model_id", self.root.name))

    @property
    def sizes(self) -> set[int]:
        return {m.preprocessing.size for m in self.members}

    # -------------------------------------------------------------- prediction
    def member_logits(self, gray: Mapping[int, np.ndarray], want_cam: bool = False
                      ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Raw logits (and CAMs) per member for decoded images ``{size: (N, size, size) uint8}``."""
        return {m.name: m.runner.run(m.preprocessing(gray[m.preprocessing.size]), want_cam)
                for m in self.members}

    def predict_gray(self, gray: Mapping[int, np.ndarray] | np.ndarray,
                     explain: bool = False) -> Prediction:
        if isinstance(gray, np.ndarray):
            gray = {s: gray for s in self.sizes}
        outs = self.member_logits(gray, want_cam=explain)
        probs = {m.name: calibrated_prob(outs[m.name][0], m.temperature) for m in self.members}
        prob = fuse(probs, self.weights)
        if not explain:
            return Prediction(prob, probs)
        maps = [_member_map(m, outs[m.name][1]) for m in self.members]
        hw = max(mp.shape[1:] for mp in maps)  # members of different sizes: the finest grid
        cam = sum(m.weight * _resize_maps(mp, hw) for m, mp in zip(self.members, maps,
                                                                   strict=True))
        supervised = any(m.heatmap == FRACTURE_MAP for m in self.members)
        # The box's score: the fused fracture map's peak where a member has one, else P.
        return Prediction(prob, probs, cam, localise(cam, None if supervised else prob))

    def decide(self, prob: np.ndarray | float, point: str | None = None):
        """True where P(fractured) >= the threshold (default or a named operating point)."""
        t = self.threshold if point is None else self.operating_points[point]["threshold"]
        return np.asarray(prob) >= t


def _member_map(m: Member, cam: np.ndarray) -> np.ndarray:
    return cam if m.heatmap == FRACTURE_MAP else _normalise_cam(cam)


def _resize_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if maps.shape[1:] == hw:
        return maps
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(mp, np.float32), mode="F")
                                .resize(hw[::-1], Image.BILINEAR)) for mp in maps])


def _normalise_cam(cam: np.ndarray) -> np.ndarray:
    """Scale each map to [0, 1] (Grad-CAM maps are compared by shape, not magnitude)."""
    hi = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    return np.where(hi > 0, cam / np.where(hi > 0, hi, 1), 0.0)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: unreadable ({e})") from None


def _check_file(path: Path, sha256: str | None) -> None:
    if not path.is_file():
        raise ModelFileError(f"{path}: model file missing")
    if sha256:
        actual = sha256_file(path)
        if actual != sha256:
            raise ModelFileError(
                f"{path}: sha256 mismatch - expected {sha256[:16]}..., found {actual[:16]}... "
                "The file was modified, truncated or replaced; refusing to load it.")


def run_meta_as_ensemble(run: Path) -> dict:
    """The ``model.json`` of a training run, seen as a one-member ensemble meta."""
    mj = _read_json(run / "model.json")
    return {
        "format": "bonefrac-run/1", "model_id": f"{mj['arch']}:{run.name}",
        "threshold": mj.get("threshold", 0.5),
        "threshold_note": mj.get("threshold_note", "default 0.5 (no validation threshold)"),
        "operating_points": mj.get("operating_points", {}),
        **{k: mj[k] for k in ("threshold_policy", "threshold_how", "fitted_on", "validation")
           if k in mj},
        "members": [{"name": mj["arch"], "arch": mj["arch"], "weights": mj["weights_file"],
                     "weights_sha256": mj.get("weights_sha256"), "config": mj,
                     "preprocessing": mj["preprocessing"],
                     "temperature": mj.get("temperature", 1.0), "fusion_weight": 1.0,
                     "threshold": mj.get("threshold", 0.5),
                     "history": "history.json" if (run / "history.json").is_file() else None}],
    }

