"""The model-folder contract: what ``ensemble_meta.json`` and ``model.json`` hold (no torch).

:class:`ModelSpec` (a model: its members, its decision rule, what it was fitted on) and
:class:`MemberSpec` (one network: architecture, files, :class:`Preprocessing`, calibration) are
the only readers and writers of the two files. Every file read goes through :func:`migrate`
(the one place that knows older layouts), then the typed parse; every write goes through
:meth:`ModelSpec.write` / :func:`write_run_meta`. Keys this version does not know are kept in
``extra`` and written back, so a folder written by a newer bonefrac survives a refit.

``spec_version``: 1 = the files written before the spec (no ``spec_version`` key; a member
without ``preprocessing.resize`` was stretch-resized), 2 = this spec. The JSON Schema
(``model_folder.schema.json`` beside this module) is generated from these classes by
:func:`json_schema`; ``tests/test_spec.py`` checks that the committed file is current.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonefrac import GRADCAM, BonefracError
from bonefrac.data.preprocess import RESIZE_MODES, Preprocessing
from bonefrac.inference.operating_points import OperatingPoint, OperatingPoints
from bonefrac.utils import write_json

SPEC_VERSION = 2
META_NAME = "ensemble_meta.json"
RUN_META = "model.json"
ENSEMBLE_FORMAT, RUN_FORMAT = "bonefrac-ensemble/1", "bonefrac-run/1"
SCHEMA_FILE = Path(__file__).with_name("model_folder.schema.json")
# Before v2 no model recorded how its square input was made: they were all stretched.
V1_RESIZE = "stretch"


class ModelFileError(BonefracError):
    """A model folder or file that is missing, tampered with or malformed."""


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field whose description goes into the JSON Schema."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True, slots=True)  # slots: a misspelt attribute is an error
class MemberSpec:
    """One member network of a model, as its entry in ``members`` stores it."""

    name: str = _doc("unique within the model; keys the fusion weights and per-member outputs")
    arch: str = _doc("registered architecture (bonefrac.models.list_models())")
    source_run: str | None = _doc("the training run the member was copied from", None)
    weights: str | None = _doc("safetensors file, relative to the model folder (a sibling "
                               "folder's file is allowed: weights stored once)", None)
    weights_sha256: str | None = _doc("sha256 of the weights file, checked before use", None)
    config: dict = _doc("the network's build settings (hidden, dropout, loc_head, heatmap, ...)",
                        factory=dict)
    preprocessing: Preprocessing = _doc("how pixels become this member's input")
    history: str | None = _doc("training history (JSON), relative to the model folder", None)
    temperature: float = _doc("calibration: P = sigmoid((z1 - z0) / temperature)")
    fusion_weight: float = _doc("weight in the fused P; the members' weights sum to 1")
    threshold: float | None = _doc("the member's own threshold at the model's policy", None)
    threshold_how: str | None = _doc("how that threshold was chosen", None)
    onnx: str | None = _doc("ONNX export, relative to the model folder", None)
    onnx_sha256: str | None = _doc("sha256 of the ONNX file, checked before use", None)
    detector: dict | None = _doc("detection head's decode settings (strides, input size, score "
                                 "and NMS thresholds); None: no detection head", None)
    extra: dict = _doc("keys this version does not know, written back as they were",
                       factory=dict)

    @property
    def heatmap(self) -> str:
        """``FRACTURE_MAP`` (a trained, box-supervised per-cell P(fracture)) or ``GRADCAM``
        (closed-form Grad-CAM of the fracture logit; models from before v2 record nothing)."""
        return self.extra.get("heatmap") or self.config.get("heatmap") or GRADCAM

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> MemberSpec:
        return _from_dict(cls, d, where=f"member {d.get('name', '?')}")


@dataclass(kw_only=True, slots=True)  # slots: a misspelt attribute is an error
class ModelSpec:
    """A model folder's meta (``ensemble_meta.json``; a run's ``model.json`` is seen as one)."""

    format: str = _doc("layout: bonefrac-ensemble/1, or bonefrac-run/1 for a run's view",
                       ENSEMBLE_FORMAT)
    spec_version: int = _doc("version of this spec the folder was written with", SPEC_VERSION)
    model_id: str = _doc("the model's name, in every prediction's provenance")
    version: str | None = _doc("bonefrac version that built the model", None)
    classes: list[str] | None = _doc("class names, index 1 = positive", None)
    positive_class: int | None = _doc("index of the reported class (fractured)", None)
    disclaimer: str | None = _doc("the research-use-only disclaimer", None)
    baseline_member: str | None = _doc("the member comparisons measure the model against", None)
    fusion: str | None = _doc("the fusion rule, in words", None)
    points: OperatingPoints = _doc("stored as `threshold` (the default decision threshold on "
                                   "the fused, calibrated P) and `operating_points`")
    members: list[MemberSpec] = _doc("one or more member networks, fused")
    weights_how: str | None = _doc("how the fusion weights were chosen", None)
    threshold_policy: str | None = _doc("policy of the default threshold", None)
    threshold_how: str | None = _doc("how the default threshold was chosen", None)
    threshold_note: str | None = _doc("a note on the threshold (e.g. not fitted)", None)
    box_threshold: float | None = _doc("detection score a box needs to be shown", None)
    box_threshold_how: str | None = _doc("how the box threshold was chosen (on validation)", None)
    validation: dict | None = _doc("what the fit measured on validation", None)
    fitted_on: dict | None = _doc("data, fingerprint, split sizes and date of the fit", None)
    domain_gate: dict | None = _doc("the input-domain gate: file, sha256, limits, how", None)
    domain_gate_skipped: str | None = _doc("why the model has no domain gate", None)
    extra: dict = _doc("keys this version does not know, written back as they were",
                       factory=dict)

    @property
    def threshold(self) -> float:
        return self.points.default

    def member(self, name: str) -> MemberSpec:
        for m in self.members:
            if m.name == name:
                return m
        raise ModelFileError(f"model {self.model_id}: no member {name!r}")

    def to_dict(self) -> dict:
        """The JSON object the folder stores (``json.dumps``-ready, key order as written)."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "meta") -> ModelSpec:
        """Parse a CURRENT-version meta (old files: :func:`migrate` first). Raises
        :class:`ModelFileError` naming ``where`` and the key at fault."""
        if not isinstance(d, Mapping):
            raise ModelFileError(f"{where}: not a JSON object")
        if d.get("spec_version") != SPEC_VERSION:
            raise ModelFileError(f"{where}: spec_version {d.get('spec_version')!r}, expected "
                                 f"{SPEC_VERSION} (migrate() older files first)")
        return _from_dict(cls, d, where)

    @classmethod
    def read(cls, root: str | os.PathLike) -> ModelSpec:
        """The meta of the folder ``root``: ``ensemble_meta.json``, else a run's ``model.json``
        seen as a one-member model. Older files are migrated in memory."""
        root = Path(root)
        if (root / META_NAME).is_file():
            path = root / META_NAME
            return cls.from_dict(migrate(read_json(path), path), str(path))
        if (root / RUN_META).is_file():
            return run_spec(root)
        raise ModelFileError(f"{root}: no {META_NAME} or {RUN_META} - not a bonefrac model "
                             "folder")

    def write(self, root: str | os.PathLike) -> Path:
        """Write ``root/ensemble_meta.json`` (atomically); returns its path."""
        if self.format != ENSEMBLE_FORMAT:
            raise ModelFileError(f"{root}: a {self.format} view is not written as {META_NAME}")
        path = Path(root) / META_NAME
        write_json(path, self.to_dict())
        return path


# ------------------------------------------------------------------------------ migration
def migrate(raw: Mapping, source: str | os.PathLike = "meta") -> dict:
    """Any ``ensemble_meta.json`` or ``model.json`` this or an earlier bonefrac wrote -> the
    same object at ``SPEC_VERSION`` (a new dict). The one place that knows older layouts.

    v1 -> v2: ``spec_version`` added; a ``preprocessing`` without ``resize`` gets
    ``"stretch"`` (what every v1 model was trained with) and its derived ``decode`` text; an
    ensemble member without ``temperature`` / ``fusion_weight`` gets 1.0, a meta without
    ``operating_points`` an empty set and without ``model_id`` its folder's name. A file from
    a NEWER spec is refused.
    """
    if not isinstance(raw, Mapping):
        raise ModelFileError(f"{source}: not a JSON object")
    d = json.loads(json.dumps(raw))  # a deep copy of plain JSON types
    version = d.get("spec_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{source}: spec_version {version!r} is not a positive integer")
    if version > SPEC_VERSION:
        raise ModelFileError(f"{source}: written with model-folder spec {version}; this "
                             f"bonefrac reads up to {SPEC_VERSION} - upgrade bonefrac")
    if version == 1:
        if "preprocessing" in d:  # a run's model.json
            d["preprocessing"] = _v1_preprocessing(d["preprocessing"], source)
        for m in d.get("members", []) if isinstance(d.get("members"), list) else []:
            if isinstance(m, dict):
                if "preprocessing" in m:
                    m["preprocessing"] = _v1_preprocessing(m["preprocessing"], source)
                m.setdefault("temperature", 1.0)
                m.setdefault("fusion_weight", 1.0)
        if "members" in d:
            d.setdefault("operating_points", {})
            d.setdefault("model_id", Path(source).parent.name)  # as v1 readers named it
    d["spec_version"] = SPEC_VERSION
    return d


def _v1_preprocessing(p: Any, source: str | os.PathLike) -> Any:
    if not isinstance(p, dict) or "resize" in p:
        return p
    try:
        return Preprocessing.from_dict({**p, "resize": V1_RESIZE}).to_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: preprocessing unusable ({e})") from None


# ----------------------------------------------------------------------- run (model.json)
RUN_REQUIRED = ("arch", "preprocessing", "weights_file")


def read_run_meta(run: str | os.PathLike) -> dict:
    """A training run's ``model.json``, migrated and checked (its required keys present, its
    preprocessing parseable). Runs keep their flat layout: see :func:`run_spec` for the
    typed, one-member view."""
    path = Path(run) / RUN_META
    mj = migrate(read_json(path), path)
    _check_run(mj, path)
    return mj


def write_run_meta(run: str | os.PathLike, mj: Mapping) -> Path:
    """Write a run's ``model.json`` (atomically) after the checks :func:`read_run_meta` makes;
    ``spec_version`` is set to this spec's."""
    path = Path(run) / RUN_META
    mj = {**mj, "spec_version": SPEC_VERSION}
    _check_run(mj, path)
    write_json(path, mj)
    return path


def _check_run(mj: Mapping, path: Path) -> None:
    missing = [k for k in RUN_REQUIRED if k not in mj]
    if missing:
        raise ModelFileError(f"{path}: not a bonefrac run file (missing {', '.join(missing)})")
    try:
        Preprocessing.from_dict(mj["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: preprocessing unusable ({e})") from None


def run_spec(run: str | os.PathLike) -> ModelSpec:
    """A training run's ``model.json`` as a one-member :class:`ModelSpec` (format
    ``bonefrac-run/1``; read-only: a run is written with :func:`write_run_meta`)."""
    run = Path(run)
    mj = read_run_meta(run)
    member = {"name": mj["arch"], "arch": mj["arch"], "weights": mj["weights_file"],
              "weights_sha256": mj.get("weights_sha256"), "config": mj,
              "preprocessing": mj["preprocessing"], "temperature": mj.get("temperature", 1.0),
              "fusion_weight": 1.0, "threshold": mj.get("threshold", 0.5),
              "history": "history.json" if (run / "history.json").is_file() else None,
              "detector": mj.get("detector")}
    meta = {"format": RUN_FORMAT, "spec_version": SPEC_VERSION,
            "model_id": f"{mj['arch']}:{run.name}", "threshold": mj.get("threshold", 0.5),
            "threshold_note": mj.get("threshold_note", "default 0.5 (no validation threshold)"),
            "operating_points": mj.get("operating_points", {}),
            **{k: mj[k] for k in ("threshold_policy", "threshold_how", "fitted_on",
                                  "validation", "box_threshold") if k in mj},
            "members": [{k: v for k, v in member.items() if v is not None}]}
    return ModelSpec.from_dict(meta, str(run / RUN_META))


def read_json(path: Path) -> dict:
    """A model's JSON file; anything unreadable is a :class:`ModelFileError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path}: unreadable ({e})") from None


# ------------------------------------------------------------------- typed (de)serialising
def _to_dict(obj: Any) -> dict:
    out: dict = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.name == "extra" or v is None:
            continue
        if isinstance(v, OperatingPoints):
            out.update(v.to_meta())
        elif isinstance(v, Preprocessing):
            out[f.name] = v.to_dict()
        elif isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
            out[f.name] = [m.to_dict() for m in v]
        else:
            out[f.name] = v
    return {**out, **obj.extra}


def _from_dict(cls: type, d: Mapping, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict = {}
    used = {"threshold", "operating_points"} if cls is ModelSpec else set()
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        if f.name == "points":
            kwargs["points"] = _points(d, where)
            continue
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ModelFileError(f"{where}: missing {f.name!r}")
            continue
        used.add(f.name)
        kwargs[f.name] = _value(hints[f.name], d[f.name], f"{where}: {f.name}")
    kwargs["extra"] = {k: v for k, v in d.items() if k not in used}
    return cls(**kwargs)


def _points(d: Mapping, where: str) -> OperatingPoints:
    try:
        return OperatingPoints.from_meta(d["threshold"], d.get("operating_points"))
    except KeyError as e:
        raise ModelFileError(f"{where}: missing {e}") from None
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: threshold / operating_points unusable ({e})") from None


def _value(tp: Any, v: Any, where: str) -> Any:
    """``v`` checked against the field type ``tp`` (and parsed, for the nested classes)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):  # X | None
        if v is None:
            return None
        tp, args = args[0], typing.get_args(args[0])
    origin = typing.get_origin(tp) or tp
    try:
        if tp is Preprocessing:
            return Preprocessing.from_dict(v)
        if origin is list and args and args[0] is MemberSpec:
            if not v or not isinstance(v, list):
                raise ModelFileError(f"{where}: a model needs at least one member")
            return [_from_dict(MemberSpec, m, f"{where} {m.get('name', i)}")
                    if isinstance(m, Mapping) else _bad(where, m) for i, m in enumerate(v)]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: unusable ({e})") from None
    ok = {float: (int, float), int: (int,), str: (str,), dict: (dict,), list: (list,)}[origin]
    if not isinstance(v, ok) or isinstance(v, bool):
        _bad(where, v)
    return float(v) if origin is float else v


def _bad(where: str, v: Any):
    raise ModelFileError(f"{where}: unexpected value {v!r}")


# ----------------------------------------------------------------------------- JSON Schema
def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of ``ensemble_meta.json``, generated from the classes
    above (``additionalProperties`` stays open: unknown keys are kept, not refused)."""
    prep = {"type": "object", "required": ["size", "mean", "std", "resize"],
            "properties": {"size": {"type": "integer", "minimum": 1},
                           "mean": _triple(), "std": _triple(),
                           "resize": {"enum": list(RESIZE_MODES)},
                           "decode": {"type": "string"}, "scale": {"type": "string"}}}
    op = _schema_of(OperatingPoint, {})
    defs = {"Preprocessing": prep, "OperatingPoint": op,
            "MemberSpec": _schema_of(MemberSpec, {})}
    top = _schema_of(ModelSpec, {"threshold": {"type": "number", "minimum": 0},
                                 "operating_points": {"type": "object",
                                                      "additionalProperties":
                                                          {"$ref": "#/$defs/OperatingPoint"}}})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:bonefrac:model-folder:v{SPEC_VERSION}",
            "title": "bonefrac ensemble_meta.json", **top, "$defs": defs}


def _triple() -> dict:
    return {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}


def _schema_of(cls: type, points: dict) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        if f.name == "points":
            props.update(points)
            required.append("threshold")
            continue
        props[f.name] = {**_type_schema(hints[f.name]),
                         **({"description": f.metadata["doc"]} if "doc" in f.metadata else {})}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    if cls is ModelSpec:
        props["spec_version"]["const"] = SPEC_VERSION
        required.append("spec_version")
    return {"type": "object", "required": required, "properties": props,
            "additionalProperties": True}


def _type_schema(tp: Any) -> dict:
    if isinstance(tp, types.UnionType):
        inner = _type_schema(typing.get_args(tp)[0])
        return {"anyOf": [inner, {"type": "null"}]}
    if tp is Preprocessing or tp is MemberSpec:
        return {"$ref": f"#/$defs/{tp.__name__}"}
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    return {"type": {str: "string", int: "integer", float: "number", dict: "object"}[origin]}
