"""What a bonefrac model folder is, decided in one place (no torch).

Two layouts hold a model:
- an ensemble folder: ``ensemble_meta.json`` naming each member's ONNX and/or safetensors file
  with its sha256;
- a training run: ``model.json`` + ``model.safetensors`` (one member), read here as a
  one-member ensemble meta so that every caller (prediction, export, reports, warm starts)
  sees one shape.

Loading, exporting and reporting used to each decide this on their own; one loader keeps the
error messages and the sha256 check the same everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bonefrac import GRADCAM, BonefracError
from bonefrac.utils import sha256_file

META_NAME = "ensemble_meta.json"
RUN_META = "model.json"
ENSEMBLE, RUN = "ensemble", "run"

# The models shipped inside the package, and the short names the CLI's --model and
# bonefrac.load() accept for them.
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_MODEL = PRETRAINED / "ensemble_bone-fracture_v2"  # 320 px, box-supervised fracture map
V1_MODEL = PRETRAINED / "ensemble_bone-fracture_v1"  # the first ensemble: 224 px, Grad-CAM
BASELINE_MODEL = PRETRAINED / "mobilenetv2_bone-fracture_v1"
SHORT_NAMES = {"ensemble": DEFAULT_MODEL, "ensemble-v2": DEFAULT_MODEL,
               "ensemble-224": V1_MODEL, "ensemble-v1": V1_MODEL, "baseline": BASELINE_MODEL}


def resolve_model(value: str | os.PathLike | None) -> Path:
    """A model given by name or path -> its folder: None -> the shipped ensemble (v2); a short
    name of ``SHORT_NAMES`` (``"ensemble"`` = v2, ``"ensemble-224"`` = v1, ``"baseline"``) ->
    that shipped model (a short name wins over a folder of that name in the working
    directory); anything else -> ``Path(value)``."""
    if value is None:
        return DEFAULT_MODEL
    if isinstance(value, str) and value in SHORT_NAMES:
        return SHORT_NAMES[value]
    return Path(value)


class ModelFileError(BonefracError):
    """A model folder or file that is missing, tampered with or malformed."""


def model_kind(path: str | os.PathLike) -> str | None:
    """``"ensemble"``, ``"run"`` or None (not a model folder), from the files present alone."""
    root = Path(path)
    if (root / META_NAME).is_file():
        return ENSEMBLE
    if (root / RUN_META).is_file():
        return RUN
    return None


def read_json(path: Path) -> dict:
    """A model's JSON file; anything unreadable is a :class:`ModelFileError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: unreadable ({e})") from None


def check_file(path: Path, sha256: str | None) -> None:
    """Refuse a missing member file, or one whose sha256 is not the one recorded (if any)."""
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
    mj = read_json(run / RUN_META)
    try:
        return _run_meta(run, mj)
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"{run / RUN_META}: not a bonefrac run file (missing {e})") from None


def _run_meta(run: Path, mj: dict) -> dict:
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


@dataclass(frozen=True)
class ModelFolder:
    """A model folder opened and read: its kind and its (ensemble-shaped) meta.

    ``meta`` is read fresh on every :meth:`open`, so callers may change their copy (export
    does) without touching anyone else's.
    """

    root: Path
    kind: str  # ENSEMBLE or RUN
    meta: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelFolder:
        """Read the folder's meta (``path``: a folder, or a short name of
        :func:`resolve_model`). Raises :class:`ModelFileError` if it is not a model folder or
        its meta file is unreadable."""
        root = resolve_model(path)
        kind = model_kind(root)
        if kind == ENSEMBLE:
            return cls(root, kind, read_json(root / META_NAME))
        if kind == RUN:
            return cls(root, kind, run_meta_as_ensemble(root))
        raise ModelFileError(f"{root}: no {META_NAME} or {RUN_META} - not a bonefrac model "
                             "folder")

    @property
    def is_run(self) -> bool:
        return self.kind == RUN

    @property
    def members(self) -> list[dict]:
        return self.meta["members"]

    def member_file(self, spec: dict, key: str, verify: bool = True) -> Path:
        """The member's ``key`` file (``"onnx"`` or ``"weights"``), checked against the sha256
        recorded beside it unless ``verify`` is False."""
        if not spec.get(key):
            hint = " (export it with `bonefrac export`)" if key == "onnx" else ""
            raise ModelFileError(f"{self.root}: member {spec['name']} has no {key} file{hint}")
        path = self.root / spec[key]
        check_file(path, spec.get(f"{key}_sha256") if verify else None)
        return path


def member_heatmap(spec: dict) -> str:
    """What a member's map output is, from its entry in the meta: ``FRACTURE_MAP`` (a trained
    per-cell P(fracture), box-supervised) or ``GRADCAM`` (closed-form Grad-CAM of the fracture
    logit; models from before v2 record nothing)."""
    return spec.get("heatmap") or spec.get("config", {}).get("heatmap", GRADCAM)
