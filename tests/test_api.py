"""The Python API (bonefrac.load / Model.predict / Result / bonefrac.evaluate), the README's
example run as written, the lazy torch-free ``import bonefrac``, ``--operating-point`` in the
CLI and the REST API, and the ``--help`` text of every option."""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from dataclasses import FrozenInstanceError, fields

import numpy as np
import pytest
from helpers import ROOT, SHIPPED_ENSEMBLE, SHIPPED_V2, SHIPPED_V3, real_images
from PIL import Image

import bonefrac
from bonefrac.cli.main import build_parser, main
from bonefrac.data.io import ImageReadError, load_gray

# The README's "Python API" example, exactly as written there (README.md must carry this
# block verbatim once it documents the API; see test_readme_block_is_this_one).
README_EXAMPLE = '''\
import bonefrac

model = bonefrac.load("ensemble")  # or "ensemble-224", "baseline", a model folder, a run folder
result = model.predict("tests/data/fractured/image1_0_png.rf.d29cab92b154a83ca5bf7e40083673a2.jpg")
print(result.prob_fractured, result.decision, result.decision_confirmation)
'''
README_FILE = "tests/data/fractured/image1_0_png.rf.d29cab92b154a83ca5bf7e40083673a2.jpg"


@pytest.fixture(scope="module")
def model():
    return bonefrac.load("ensemble")


def _cli_rows(tmp_path, *args) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    assert main(["predict", *map(str, args), "--out", str(out), "--quiet"]) == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads((out / "predictions.json").read_text()), rows


def test_import_is_lazy_fast_and_torch_free():
    code = ("import sys, time; t = time.perf_counter(); import bonefrac; "
            "dt = time.perf_counter() - t; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not [m for m in sys.modules if m.startswith('bonefrac.')], 'eager'; "
            "ens = bonefrac.inference.Ensemble.load('baseline'); "
            "assert 'torch' not in sys.modules; print(dt)")
    times = [float(subprocess.run([sys.executable, "-c", code], check=True, text=True,
                                  capture_output=True, cwd=ROOT).stdout) for _ in range(3)]
    assert min(times) < 0.3, times


def test_readme_example_prints_what_bonefrac_predict_writes(tmp_path):
    run = subprocess.run([sys.executable, "-c", README_EXAMPLE], check=True, text=True,
                         capture_output=True, cwd=ROOT)
    printed = run.stdout.split()
    _, rows = _cli_rows(tmp_path, ROOT / README_FILE)
    assert float(printed[0]) == float(rows[0]["prob_fractured"])
    assert printed[1:] == [rows[0]["decision"], rows[0]["decision_confirmation"]]


def test_readme_block_is_this_one():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if "bonefrac.load(" not in text:
        pytest.skip("README.md does not document the Python API yet")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert README_EXAMPLE in blocks


def test_result_fields_are_the_csv_columns(model, tmp_path):
    files = real_images(3)
    data, rows = _cli_rows(tmp_path, *files)
    results = model.predict(files)
    assert isinstance(results, list) and len(results) == 3
    for res, row in zip(results, data["predictions"], strict=True):
        dets = row.pop("detections")  # predictions.json's list; detections.csv in the CLI
        assert res.row() == row  # same columns, same order, same values
        assert list(res.row()) == list(rows[0])
        assert list(res.detections) == dets and len(dets) >= 1
        assert set(res.prob_members) == {m.name for m in model.ensemble.members}
        assert res.heatmap is None
    names = {f.name for f in fields(bonefrac.Result)} - {"prob_members", "heatmap", "detections",
                                                          "image", "box_threshold"}
    assert names <= set(rows[0])
    with pytest.raises(FrozenInstanceError):
        results[0].decision = "x"


def test_arrays_match_files_and_explain_gives_the_map(model, tmp_path):
    gray = load_gray(real_images(1)[0], None)
    png = tmp_path / "same.png"
    Image.fromarray(gray).save(png)
    from_file = model.predict(png)
    from_u8, from_float = model.predict([gray, gray / 255.0], explain=True)
    assert from_u8.prob_fractured == from_file.prob_fractured == from_float.prob_fractured
    assert from_u8.file == "array[0]" and from_float.file == "array[1]"
    assert from_u8.heatmap.shape == gray.shape and from_u8.heatmap.dtype == np.float32
    assert 0 <= from_u8.heatmap.min() <= from_u8.heatmap.max() <= 1
    with pytest.raises(ValueError):
        model.predict(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError):
        model.predict(np.full((64, 64), 2.0))
    with pytest.raises(ImageReadError):
        model.predict(tmp_path / "missing.jpg")


def test_operating_point_drives_decision(model):
    f = real_images(1)[0]
    for point, t in model.operating_points.items():
        r = model.predict(f, operating_point=point)
        assert r.threshold == pytest.approx(t, abs=1e-6)
        assert r.decision == ("fractured" if r.prob_fractured >= t else "non_fractured")
        # the probability of the stated decision, never the distance from 0.5
        p = r.prob_fractured
        assert r.confidence == pytest.approx(p if r.decision == "fractured" else 1 - p)
    with pytest.raises(ValueError, match="operating point"):
        model.predict(f, operating_point="magic")


def test_load_accepts_short_names_and_folders():
    assert bonefrac.load("ensemble").root == SHIPPED_V3
    assert bonefrac.load("ensemble-v2").root == SHIPPED_V2
    assert bonefrac.load("ensemble-224").root == SHIPPED_ENSEMBLE
    assert bonefrac.load(SHIPPED_V3).model_id == bonefrac.load().model_id
    assert bonefrac.inference.Ensemble.load("baseline").model_id.startswith("mobilenetv2")


def test_load_of_a_mistyped_name_says_it_does_not_exist_and_lists_the_names():
    from bonefrac.inference.model_folder import ModelFileError

    with pytest.raises(ModelFileError, match=r"^ensembel does not exist; give a model folder "
                       r"or a shipped model name \(ensemble, ensemble-v2, ensemble-224, "
                       r"baseline\)$"):
        bonefrac.load("ensembel")


def test_cli_operating_point_column_and_json(tmp_path):
    meta = json.loads((SHIPPED_V3 / "ensemble_meta.json").read_text())  # the default model
    t = meta["operating_points"]["confirmation"]["threshold"]
    data, rows = _cli_rows(tmp_path, *real_images(4), "--operating-point", "confirmation")
    assert data["operating_point"] == "confirmation"
    assert data["decision_threshold"] == pytest.approx(t)
    for r in rows:
        assert float(r["threshold"]) == pytest.approx(t, abs=1e-6)
        assert r["decision"] == r["decision_confirmation"]


def test_rest_operating_point(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bonefrac.serving import create_app

    f = real_images(1)[0]
    with TestClient(create_app(SHIPPED_ENSEMBLE)) as c:
        for how in ("query", "form"):
            kw = ({"params": {"operating_point": "triage"}} if how == "query"
                  else {"data": {"operating_point": "triage"}})
            r = c.post("/v1/predict", files={"file": (f.name, f.read_bytes())}, **kw)
            assert r.status_code == 200, r.text
            p = r.json()["prediction"]
            assert p["decision"] == p["decision_triage"]
            assert p["threshold"] == pytest.approx(
                r.json()["model"]["operating_points"]["triage"], abs=1e-6)
        r = c.post("/v1/predict", files={"file": (f.name, f.read_bytes())},
                   params={"operating_point": "magic"})
        assert r.status_code == 422 and "operating_point" in r.json()["detail"]


def _subparsers(parser: argparse.ArgumentParser):
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_every_option_has_help_and_a_real_default():
    for prog, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction |
                          argparse._VersionAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{prog} {name}: no help text"
        text = parser.format_help()
        assert "(default: None)" not in text, f"{prog}: shows '(default: None)'"


@pytest.mark.slow
def test_evaluate_runs_the_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    res = bonefrac.evaluate("baseline", ROOT / "tests" / "data", split="all",
                            out=tmp_path / "res")
    assert res["n"] == len(real_images()) and 0 <= res["metrics"]["roc_auc"]["value"] <= 1
    assert (tmp_path / "res" / "metrics.json").is_file()


# ------------------------------------------------ uint16 arrays, errors="return", overlays
def test_uint16_arrays_are_windowed_as_stated(model):
    """A pydicom-style pixel_array: 12 bits in uint16 scales 0..4095 to 0..255 (the stored
    range, as a DICOM file without a window is read); window=(c, w) is DICOM's linear VOI."""
    from bonefrac.inference.api import window_to_uint8

    gray = load_gray(real_images(1)[0], None)
    twelve = gray.astype(np.uint16) * 16  # 0..4080: fills 12 bits
    assert np.abs(window_to_uint8(twelve).astype(int) - gray).max() <= 1
    full = gray.astype(np.uint16) * 257  # 0..65535: fills 16 bits
    assert np.abs(window_to_uint8(full).astype(int) - gray).max() <= 1
    assert window_to_uint8(np.array([[100, 1000, 2000, 5000]], np.uint16),
                           window=(1500, 1001)).tolist() == [[0, 0, 255, 255]]
    ref = model.predict(gray)
    assert model.predict(twelve).prob_fractured == pytest.approx(ref.prob_fractured, abs=2e-3)
    with pytest.raises(ValueError, match="window"):
        model.predict(np.full((64, 64), -5, np.int16))
    with pytest.raises(ValueError, match="window width"):
        window_to_uint8(twelve, window=(100, 0))


def test_errors_return_keeps_the_others_results(model, tmp_path):
    files = real_images(2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError):
        model.predict([files[0], bad, files[1]])
    out = model.predict([files[0], bad, np.zeros((4, 4, 3)), files[1]], errors="return")
    assert [r.ok for r in out] == [True, False, False, True]
    assert out[1].file == str(bad) and "recognised image format" in out[1].reason
    assert out[2].file == "array[2]" and "(H, W)" in out[2].reason
    assert out[0] == model.predict(files[0]) and out[3] == model.predict(files[1])
    with pytest.raises(ValueError, match="errors must be"):
        model.predict(files, errors="ignore")


def test_result_save_overlay_is_the_cli_overlay(model, tmp_path):
    f = real_images(1)[0]
    out = tmp_path / "cli"
    assert main(["predict", str(f), "--out", str(out), "--explain", "--quiet"]) == 0
    (cli_png,) = (out / "heatmaps").glob("*.png")
    r = model.predict(f, explain=True)
    path = r.save_overlay(tmp_path / "api.png")
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    b = np.asarray(Image.open(cli_png).convert("RGB")).astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0  # the same figure
    with pytest.raises(ValueError, match="explain=True"):
        model.predict(f).save_overlay(tmp_path / "none.png")
