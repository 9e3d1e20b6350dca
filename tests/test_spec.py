"""The model-folder spec (bonefrac.inference.spec) and the decision rule (OperatingPoints).

Every shipped folder round-trips through the typed spec unchanged and validates against the
committed JSON Schema; files from before the spec load through ``migrate`` alone; unknown keys
survive a write; a model input is never made without the resize mode its model says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers import ROOT, SHIPPED_ENSEMBLE, real_images

import bonefrac
from bonefrac.data.io import load_gray
from bonefrac.data.preprocess import Preprocessing
from bonefrac.inference import Ensemble, ModelFileError, ModelFolder
from bonefrac.inference.model_folder import PRETRAINED, SHORT_NAMES, write_meta
from bonefrac.inference.operating_points import (
    OperatingPoint,
    OperatingPoints,
    UnknownOperatingPoint,
)
from bonefrac.inference.spec import (
    META_NAME,
    SCHEMA_FILE,
    SPEC_VERSION,
    ModelSpec,
    json_schema,
    migrate,
    read_json,
    read_run_meta,
    write_run_meta,
)
from bonefrac.utils import write_json

SHIPPED = sorted(p.parent for p in PRETRAINED.glob(f"*/{META_NAME}"))


def plain(obj) -> object:
    """JSON's view of ``obj`` (tuples as lists, floats as written)."""
    return json.loads(json.dumps(obj))


def test_committed_schema_is_the_generated_one():
    """Regenerate with: python -c "from bonefrac.inference.spec import *; from bonefrac.utils
    import write_json; write_json(SCHEMA_FILE, json_schema())"."""
    assert json.loads(SCHEMA_FILE.read_text()) == plain(json_schema())
    jsonschema.Draft202012Validator.check_schema(json_schema())


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_folder_round_trips_and_validates(folder):
    raw = read_json(folder / META_NAME)
    assert raw["spec_version"] == SPEC_VERSION  # shipped files were migrated in place
    jsonschema.validate(raw, json_schema())
    spec = ModelSpec.read(folder)
    assert plain(spec.to_dict()) == raw
    assert plain(ModelSpec.from_dict(spec.to_dict()).to_dict()) == raw


def test_shipped_names_cover_every_shipped_folder():
    assert set(SHIPPED) == set(SHORT_NAMES.values())


def _as_v1(meta: dict) -> dict:
    """A meta as bonefrac wrote it before the spec: no spec_version, no resize."""
    old = json.loads(json.dumps(meta))
    del old["spec_version"]
    for m in old["members"]:
        del m["preprocessing"]["resize"]
        m["preprocessing"]["decode"] = "grayscale, EXIF-oriented, bilinear resize"
    return old


def test_a_v1_folder_loads_through_migrate_and_predicts_the_same(tmp_path):
    """v1 = the shipped ensemble-224 as it was committed before the spec."""
    v1 = PRETRAINED / "ensemble_bone-fracture_v1"
    old = shutil.copytree(v1, tmp_path / "v1")
    write_json(old / META_NAME, _as_v1(read_json(v1 / META_NAME)))
    assert plain(migrate(read_json(old / META_NAME))) == read_json(v1 / META_NAME)
    files = real_images(3)
    a = Ensemble.load(old, backend="onnx")
    b = Ensemble.load(v1, backend="onnx")
    assert a.resize == "stretch" and a.threshold == b.threshold
    gray = {s: np.stack([load_gray(f, s, b.resize) for f in files]) for s in b.sizes}
    assert np.array_equal(a.predict_gray(gray).prob, b.predict_gray(gray).prob)


def test_a_v1_run_file_migrates_and_is_written_current(tmp_path):
    mj = {"arch": "mobilenetv2", "hidden": 8, "dropout": 0.0, "weights_file": "model.safetensors",
          "preprocessing": {"size": 96, "mean": [0.5] * 3, "std": [0.5] * 3}}
    write_json(tmp_path / "model.json", mj)
    got = read_run_meta(tmp_path)
    assert got["spec_version"] == SPEC_VERSION and got["preprocessing"]["resize"] == "stretch"
    write_run_meta(tmp_path, got)
    assert read_json(tmp_path / "model.json") == got
    with pytest.raises(ModelFileError, match="missing weights_file"):
        write_run_meta(tmp_path, {k: v for k, v in got.items() if k != "weights_file"})


def test_unknown_keys_survive_a_rewrite(tmp_path):
    """A folder from a newer bonefrac (same spec version) keeps what this one ignores."""
    model = shutil.copytree(SHIPPED_ENSEMBLE, tmp_path / "m")
    meta = read_json(model / META_NAME)
    meta["future_key"] = {"a": 1}
    meta["members"][0]["future_member_key"] = [1, 2]
    meta["operating_points"]["triage"]["future_point_key"] = "x"
    meta["members"][1]["detector"] = {"strides": [8, 16, 32], "input_size": 320,
                                      "score_threshold": 0.05, "nms_iou": 0.5}
    meta["box_threshold"] = 0.3
    write_meta(model, meta)
    spec = ModelFolder.open(model).spec
    assert spec.extra == {"future_key": {"a": 1}} and spec.box_threshold == 0.3
    assert spec.members[0].extra == {"future_member_key": [1, 2]}
    assert spec.members[1].detector["strides"] == [8, 16, 32]
    assert spec.points.points["triage"].extra == {"future_point_key": "x"}
    assert read_json(model / META_NAME) == plain(meta)
    jsonschema.validate(read_json(model / META_NAME), json_schema())
    with pytest.raises(AttributeError):  # a misspelt field fails, it is not silently dropped
        spec.box_treshold = 0.5


@pytest.mark.parametrize(("damage", "message"), [
    (lambda m: m.update(spec_version=SPEC_VERSION + 1), "upgrade bonefrac"),
    (lambda m: m["members"][0]["preprocessing"].pop("resize"), "preprocessing"),
    (lambda m: m["members"][0].update(temperature="hot"), "temperature"),
    (lambda m: m.pop("model_id"), "model_id"),
    (lambda m: m.update(members=[]), "at least one member"),
    (lambda m: m["operating_points"]["triage"].update(threshold=7), "outside"),
])
def test_a_malformed_meta_is_refused_naming_the_file_and_key(tmp_path, damage, message):
    model = shutil.copytree(SHIPPED_ENSEMBLE, tmp_path / "m")
    meta = read_json(model / META_NAME)
    damage(meta)
    write_json(model / META_NAME, meta)
    with pytest.raises(ModelFileError, match=message) as e:
        ModelFolder.open(model)
    assert str(model / META_NAME) in str(e.value)


def test_a_member_file_outside_the_folder_and_its_siblings_is_refused(tmp_path):
    model = shutil.copytree(SHIPPED_ENSEMBLE, tmp_path / "a" / "m")
    meta = read_json(model / META_NAME)
    meta["members"][0]["onnx"] = "../../elsewhere.onnx"
    write_json(model / META_NAME, meta)
    with pytest.raises(ModelFileError, match="inside the model folder or a sibling"):
        Ensemble.load(model, backend="onnx")


def test_no_resize_no_model_input(tmp_path):
    """The geometry has no default below the spec: forgetting it is an error."""
    f = real_images(1)[0]
    with pytest.raises(bonefrac.InputError, match="resize must be one of"):
        load_gray(f, 64)
    with pytest.raises(TypeError):
        Preprocessing(224, (0.5,) * 3, (0.5,) * 3)  # type: ignore[call-arg]
    assert load_gray(f).ndim == 2  # the image's own size needs no resize mode


def test_no_stretch_default_left_in_src():
    """``"stretch"`` appears only where it is a value (the spec's v1 migration, the backbones'
    own ImageNet input, the training option, names of the modes), never as a fallback."""
    import ast

    for f in (ROOT / "src" / "bonefrac").rglob("*.py"):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                for d in [*node.defaults, *node.kw_defaults]:
                    assert not (isinstance(d, ast.Constant) and d.value == "stretch"), f
            if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".get")
                    and len(node.args) == 2 and ast.unparse(node.args[1]) == "'stretch'"):
                raise AssertionError(f"{f}:{node.lineno}: {ast.unparse(node)}")


# ------------------------------------------------------------------------ operating points
def test_operating_points_name_threshold_and_decide():
    ops = OperatingPoints(0.2, {"confirmation": OperatingPoint(0.6, "specificity:0.90")})
    assert ops.names == ("default", "confirmation")
    assert ops.threshold() == ops.threshold("default") == 0.2
    assert ops.threshold("confirmation") == 0.6
    assert ops.decide(np.array([0.1, 0.2, 0.7]), "confirmation").tolist() == [False, False, True]
    assert ops.thresholds() == {"default": 0.2, "confirmation": 0.6}
    with pytest.raises(UnknownOperatingPoint, match="this model has: default, confirmation"):
        ops.threshold("magic")
    assert issubclass(UnknownOperatingPoint, ValueError)
    assert OperatingPoints.from_meta(**{"threshold": 0.2, "points": ops.to_meta()[
        "operating_points"]}) == ops


def test_the_unknown_operating_point_check_exists_once():
    hits = [f for f in (ROOT / "src" / "bonefrac").rglob("*.py")
            if "unknown operating point" in f.read_text()]
    assert [f.name for f in hits] == ["operating_points.py"]


def test_every_caller_decides_with_the_model_points():
    model = bonefrac.load("baseline")
    f = real_images(1)[0]
    for point in model.ensemble.points.names:
        r = model.predict(f, operating_point=point)
        t = model.ensemble.points.threshold(point)
        assert r.threshold == pytest.approx(t, abs=1e-6)
        assert r.decision == ("fractured" if r.prob_fractured >= t else "non_fractured")


def test_baseline_shares_v1s_member_files():
    """Weights stored once: the baseline's member is v1's MobileNetV2, by path and sha256."""
    base, v1 = ModelFolder.open("baseline"), ModelFolder.open("ensemble-224")
    m, v1m = base.spec.members[0], v1.spec.member("mobilenetv2")
    for key in ("onnx", "weights"):
        assert base.member_file(m, key).resolve() == v1.member_file(v1m, key).resolve()
    assert Path(base.root, m.onnx).resolve().parent == v1.root.resolve()


@pytest.mark.slow
def test_exporting_the_baseline_copies_v1s_files_in_and_writes_nothing_beside_it(tmp_path):
    """A folder that names a sibling's file exports (and adapts) to a folder that stands alone."""
    pytest.importorskip("torch")
    from bonefrac.export.onnx import export_model

    out = tmp_path / "exported" / "baseline"
    export_model(SHORT_NAMES["baseline"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    m = ModelFolder.open(out).spec.members[0]
    assert (m.onnx, m.weights, m.history) == ("mobilenetv2.onnx", "mobilenetv2.safetensors",
                                              "mobilenetv2_history.json")
    files = real_images(2)
    a, b = Ensemble.load(out, backend="onnx"), Ensemble.load("baseline", backend="onnx")
    gray = {s: np.stack([load_gray(f, s, b.resize) for f in files]) for s in b.sizes}
    assert np.allclose(a.predict_gray(gray).prob, b.predict_gray(gray).prob, atol=1e-5)
