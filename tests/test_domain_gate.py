"""The input-domain gate: cheap checks, the shipped learned check, --no-gate, old models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import EXAMPLES, SHIPPED_V2, load_script, real_images
from PIL import Image

from bonefrac.data.io import load_gray
from bonefrac.inference.domain import (
    GATE_FILE,
    MIN_SIDE,
    UNCERTAIN,
    cheap_checks,
    dicom_checks,
)
from bonefrac.inference.ensemble import Ensemble, ModelFileError
from bonefrac.inference.predict import predict_files


@pytest.fixture(scope="module")
def v2():
    return Ensemble.load(SHIPPED_V2, backend="onnx", threads=1)


def _check(path: Path) -> str:
    return cheap_checks(path, load_gray(path, 320, "stretch"))


def test_cheap_checks_name_each_reason(tmp_path):
    src = real_images(1)[0]
    g = Image.open(src).convert("L")
    g.resize((80, 64)).save(tmp_path / "small.png")
    g.resize((900, 150)).save(tmp_path / "long.png")
    Image.new("L", (400, 400), 90).save(tmp_path / "blank.png")
    colour = load_script("evaluations/domain_gate.py").colour_photo(src)
    colour.save(tmp_path / "colour.jpg")
    assert f"minimum {MIN_SIDE} px" in _check(tmp_path / "small.png")
    assert "aspect ratio 6.0:1" in _check(tmp_path / "long.png")
    assert "uniform" in _check(tmp_path / "blank.png")
    assert "colour image" in _check(tmp_path / "colour.jpg")
    # the same pixels saved as an RGB JPEG of a grey image are not colour
    g.convert("RGB").save(tmp_path / "grey_rgb.jpg")
    assert _check(tmp_path / "grey_rgb.jpg") == ""
    for f in real_images() + sorted(EXAMPLES.glob("*.jpg")):  # no false alarms
        assert _check(f) == "", f


def test_dicom_modality_and_body_part(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    src = Path(pydicom.__file__).parent / "data" / "test_files"
    assert "modality CT is not a plain radiograph" in dicom_checks(src / "CT_small.dcm")
    ds = pydicom.dcmread(src / "CT_small.dcm")
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.save_as(tmp_path / "chest.dcm")
    note = dicom_checks(tmp_path / "chest.dcm")
    assert "modality" not in note and "body part CHEST" in note
    ds.BodyPartExamined = "HAND"
    ds.Rows = ds.Columns = 128
    ds.save_as(tmp_path / "hand.dcm")
    assert "body part" not in dicom_checks(tmp_path / "hand.dcm")


@pytest.mark.slow
def test_shipped_gate_flags_non_radiographs_not_radiographs(v2, tmp_path):
    """The benchmark's folder of non-radiographs (package material): >= 95% uncertain, each
    with its reason; the committed real radiographs: none flagged."""
    assert v2.gate is not None and v2.gate_note == ""
    ood = load_script("evaluations/domain_gate.py").build_non_radiographs(tmp_path / "ood")
    res = predict_files(v2, ood, progress=False, workers=1)
    flagged = [r for r in res.rows if r["decision"] == UNCERTAIN]
    assert (len(flagged) + len(res.errors)) / len(ood) >= 0.95, \
        [(r["file"], r["domain_score"]) for r in res.rows if r["decision"] != UNCERTAIN]
    assert all(r["warning"] for r in flagged)
    noise = next(r for r in res.rows if r["file"].endswith("noise_grey_0.png"))
    assert noise["domain_score"] > 1 and "outside the training distribution" in noise["warning"]
    real = predict_files(v2, real_images() + sorted(EXAMPLES.glob("*.jpg")), progress=False,
                         workers=1)
    assert not real.errors and all(r["decision"] != UNCERTAIN for r in real.rows), \
        [(r["file"], r["warning"]) for r in real.rows if r["warning"]]
    assert all(0 < r["domain_score"] < 1 for r in real.rows)


def test_no_gate_keeps_the_decision_and_the_warning(tmp_path, capsys):
    from bonefrac.cli.main import main

    noise = tmp_path / "in" / "noise.png"
    noise.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300), np.uint8)).save(noise)
    rows = {}
    for flag in ([], ["--no-gate"]):
        out = tmp_path / f"out{len(flag)}"
        assert main(["predict", str(noise.parent), "--out", str(out), "--quiet", *flag]) == 0
        data = json.loads((out / "predictions.json").read_text())
        rows[bool(flag)] = (data["predictions"][0], data["domain_gate"], data["model_fingerprint"])
    (on, gate_on, fp_on), (off, gate_off, fp_off) = rows[False], rows[True]
    assert on["decision"] == UNCERTAIN and off["decision"] in ("fractured", "non_fractured")
    assert on["warning"] == off["warning"] and on["domain_score"] == off["domain_score"] > 1
    assert gate_on["decides"] and not gate_off["decides"] and fp_on != fp_off  # no mixed resume


def test_api_result_has_domain_score_and_gate_switch():
    import bonefrac

    model = bonefrac.load("ensemble")
    arr = np.random.default_rng(2).integers(0, 256, (256, 256), np.uint8)
    on, off = model.predict(arr), model.predict(arr, gate=False)
    assert on.decision == UNCERTAIN and off.decision != UNCERTAIN
    assert on.domain_score == off.domain_score > 1 and on.row()["domain_score"] == on.domain_score


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("Results", "*.safetensors"))
    return dst


def test_tampered_gate_file_is_refused(tmp_path):
    m = _copy_model(SHIPPED_V2, tmp_path / "m")
    with open(m / GATE_FILE, "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        Ensemble.load(m, backend="onnx")


@pytest.mark.slow
def test_models_without_gate_or_pooled_output_load_with_gate_off(tmp_path):
    """A model fitted before the gate (no ``domain_gate`` in its meta) and one whose ONNX graphs
    lack the pooled output (exported before it) both predict, the learned check off, saying so."""
    onnx = pytest.importorskip("onnx")
    from bonefrac.utils import sha256_file, write_json

    old = _copy_model(SHIPPED_V2, tmp_path / "old_meta")
    meta = json.loads((old / "ensemble_meta.json").read_text())
    meta.pop("domain_gate")
    write_json(old / "ensemble_meta.json", meta)
    ens = Ensemble.load(old, backend="onnx")
    assert ens.gate is None and "has none" in ens.gate_note

    graph = _copy_model(SHIPPED_V2, tmp_path / "old_graph")
    meta = json.loads((graph / "ensemble_meta.json").read_text())
    for spec in meta["members"]:
        g = onnx.load(graph / spec["onnx"])
        keep = [o for o in g.graph.output if o.name != "pooled"]
        del g.graph.output[:]
        g.graph.output.extend(keep)
        onnx.save(g, graph / spec["onnx"])
        spec["onnx_sha256"] = sha256_file(graph / spec["onnx"])
    write_json(graph / "ensemble_meta.json", meta)
    ens = Ensemble.load(graph, backend="onnx")
    assert ens.gate is None and "no pooled-feature output" in ens.gate_note
    res = predict_files(ens, real_images(2), progress=False, workers=1)
    ref = predict_files(Ensemble.load(SHIPPED_V2, backend="onnx"), real_images(2),
                        progress=False, workers=1)
    assert [r["domain_score"] for r in res.rows] == [None, None]
    assert [r["prob_fractured"] for r in res.rows] == [r["prob_fractured"] for r in ref.rows]
