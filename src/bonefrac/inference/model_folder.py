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

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The spec's names are re-exported: callers have always imported them from this module.
from bonefrac.inference.spec import (  # noqa: F401
    META_NAME,
    RUN_META,
    MemberSpec,
    ModelFileError,
    ModelSpec,
    migrate,
    read_json,
    run_spec,
)
from bonefrac.utils import sha256_file

ENSEMBLE, RUN = "ensemble", "run"

# The models shipped inside the package, and the short names the CLI's --model and
# bonefrac.load() accept for them.
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
V3_MODEL = PRETRAINED / "ensemble_bone-fracture_v3"  # + a detection head (384 px member)
V2_MODEL = PRETRAINED / "ensemble_bone-fracture_v2"  # 320 px, box-supervised fracture map
DEFAULT_MODEL = V3_MODEL
V1_MODEL = PRETRAINED / "ensemble_bone-fracture_v1"  # the first ensemble: 224 px, Grad-CAM
BASELINE_MODEL = PRETRAINED / "mobilenetv2_bone-fracture_v1"
SHORT_NAMES = {"ensemble": DEFAULT_MODEL, "ensemble-v3": V3_MODEL, "ensemble-v2": V2_MODEL,
               "ensemble-224": V1_MODEL, "ensemble-v1": V1_MODEL, "baseline": BASELINE_MODEL}


def resolve_model(value: str | os.PathLike | None) -> Path:
    """A model given by name or path -> its folder: None -> the shipped ensemble (v3); a short
    name of ``SHORT_NAMES`` (``"ensemble"`` = v3, ``"ensemble-v2"`` = v2, ``"ensemble-224"`` =
    v1, ``"baseline"``) ->
    that shipped model (a short name wins over a folder of that name in the working
    directory); anything else -> ``Path(value)``."""
    if value is None:
        return DEFAULT_MODEL
    if isinstance(value, str) and value in SHORT_NAMES:
        return SHORT_NAMES[value]
    return Path(value)


def model_kind(path: str | os.PathLike) -> str | None:
    """``"ensemble"``, ``"run"`` or None (not a model folder), from the files present alone."""
    root = Path(path)
    if (root / META_NAME).is_file():
        return ENSEMBLE
    if (root / RUN_META).is_file():
        return RUN
    return None


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
    """The ``model.json`` of a training run, seen as a one-member ensemble meta (a dict)."""
    return run_spec(run).to_dict()


@dataclass(frozen=True)
class ModelFolder:
    """A model folder opened and read: its kind and its typed :class:`ModelSpec`.

    ``meta`` is the spec as a JSON dict, made fresh on every :meth:`open`, so callers may
    change their copy (and write it back with :func:`write_meta`) without touching anyone
    else's.
    """

    root: Path
    kind: str  # ENSEMBLE or RUN
    spec: ModelSpec
    meta: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelFolder:
        """Read the folder's meta (``path``: a folder, or a short name of
        :func:`resolve_model`), migrated to the current spec. Raises :class:`ModelFileError`
        if it is not a model folder or its meta file is unreadable or malformed."""
        root = resolve_model(path)
        kind = model_kind(root)
        names = ", ".join(k for k in SHORT_NAMES if not k.endswith(("-v1", "-v3")))
        if not root.exists():  # a typo of a short name, or a folder that is not there
            raise ModelFileError(f"{root} does not exist; give a model folder or a shipped "
                                 f"model name ({names})")
        if kind is None:
            raise ModelFileError(f"{root}: no {META_NAME} or {RUN_META} - not a bonefrac model "
                                 f"folder (shipped model names: {names})")
        spec = ModelSpec.read(root)
        return cls(root, kind, spec, spec.to_dict())

    @property
    def is_run(self) -> bool:
        return self.kind == RUN

    @property
    def members(self) -> list[dict]:
        """The members as JSON dicts (``self.spec.members`` are the typed ones)."""
        return self.meta["members"]

    def member_file(self, member: MemberSpec | Mapping, key: str, verify: bool = True) -> Path:
        """The member's ``key`` file (``"onnx"`` or ``"weights"``), checked against the sha256
        recorded beside it unless ``verify`` is False. ``member``: a :class:`MemberSpec` or
        its dict (``self.members``). The path may name a file in a sibling folder
        (``../ensemble_bone-fracture_v1/mobilenetv2.onnx``: weights stored once), nothing
        further away and never an absolute one."""
        m = member if isinstance(member, MemberSpec) else self.spec.member(member["name"])
        name = getattr(m, key)
        if not name:
            hint = " (export it with `bonefrac export`)" if key == "onnx" else ""
            raise ModelFileError(f"{self.root}: member {m.name} has no {key} file{hint}")
        path = self.root / name
        if Path(name).is_absolute() or not path.resolve().is_relative_to(
                self.root.resolve().parent):
            raise ModelFileError(f"{self.root}: member {m.name}: {key} {name!r} must be a "
                                 "path inside the model folder or a sibling of it")
        if key == "weights" and not path.exists() and self.root.is_relative_to(PRETRAINED):
            # the wheel ships the shipped models' ONNX only (it must stay under 100 MiB)
            raise ModelFileError(
                f"{path}: not installed. The bonefrac wheel carries the shipped models' ONNX "
                "files only (enough to predict); the safetensors weights that --backend torch, "
                "adapt, export and train --init-from need are in the source repository: "
                "install from a clone (pip install -e '.[train]')")
        check_file(path, getattr(m, f"{key}_sha256") if verify else None)
        return path


def write_meta(root: str | os.PathLike, meta: Mapping | ModelSpec) -> Path:
    """Write ``root/ensemble_meta.json`` from a spec or its dict, checked by the spec (the one
    writer of the file); returns its path."""
    spec = meta if isinstance(meta, ModelSpec) else ModelSpec.from_dict(
        migrate(meta, Path(root) / META_NAME), str(Path(root) / META_NAME))
    return spec.write(root)


def member_heatmap(spec: Mapping | MemberSpec) -> str:
    """What a member's map output is (:attr:`MemberSpec.heatmap`), from its typed spec or its
    entry in the meta."""
    return (spec if isinstance(spec, MemberSpec) else MemberSpec.from_dict(spec)).heatmap
