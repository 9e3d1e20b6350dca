"""The shipped models: v1 (224 px) still predicts exactly as it did before v2; v2 is the default."""

from __future__ import annotations

import json

import pytest
from helpers import SHIPPED_ENSEMBLE, TEST_DATA, real_images

from bonefrac.inference import Ensemble
from bonefrac.inference.predict import predict_files


def test_v1_predictions_are_unchanged():
    """Probabilities and decisions on the 28 test radiographs equal those written by the code
    before v2 (tests/data/v1_expected_predictions.json, commit ac00fd4)."""
    expected = json.loads((TEST_DATA / "v1_expected_predictions.json").read_text())
    res = predict_files(Ensemble.load(SHIPPED_ENSEMBLE), real_images(), progress=False)
    got = {r["file"].split("tests/data/")[-1]: r for r in res.rows}
    assert set(got) == set(expected)
    for name, want in expected.items():
        for key, value in want.items():
            if key.startswith("prob_"):
                assert got[name][key] == pytest.approx(value, abs=2e-6), (name, key)
            else:
                assert got[name][key] == value, (name, key)


def test_evaluate_compare_with_adds_both_models_to_comparison_md(tmp_path):
    """Two real shipped models on the same images with boxes: the table has both, the paired
    AUC-difference CI, both error types and both pointing games."""
    import shutil

    from helpers import SHIPPED_BASELINE

    from bonefrac.data.dataset import load_index
    from bonefrac.evaluation.evaluate import evaluate_model

    data = tmp_path / "data"
    shutil.copytree(TEST_DATA, data)
    shutil.copy(TEST_DATA / "fracture_boxes.csv", data / "boxes.csv")
    res = evaluate_model(SHIPPED_ENSEMBLE, load_index(data), split="test", out=tmp_path / "r",
                         compare_with=SHIPPED_BASELINE)
    cmp = res["compared_with"]
    lo, hi = cmp["auc_diff"]["ci95"]
    assert lo <= cmp["auc_diff"]["value"] <= hi
    assert set(cmp["errors"]) == set(cmp["models"]) and len(cmp["models"]) == 2
    text = (tmp_path / "r" / "comparison.md").read_text()
    new, old = cmp["models"]
    assert f"## {new} vs {old}" in text and "paired stratified bootstrap" in text
    assert "false negatives" in text and text.count("| 0.") >= 2


def test_v3_is_the_default_and_v2_v1_stay_selectable_by_name():
    from bonefrac.inference.model_folder import (
        DEFAULT_MODEL,
        V1_MODEL,
        V2_MODEL,
        V3_MODEL,
        resolve_model,
    )

    assert resolve_model(None) == resolve_model("ensemble") == DEFAULT_MODEL == V3_MODEL
    assert resolve_model("ensemble-v2") == V2_MODEL
    assert resolve_model("ensemble-224") == resolve_model("ensemble-v1") == V1_MODEL
    assert V1_MODEL == SHIPPED_ENSEMBLE
    v3 = Ensemble.load("ensemble")
    assert v3.sizes == {320, 384} and v3.detector.name == "mobilenetv2" and v3.box_threshold > 0
    v2 = Ensemble.load("ensemble-v2")
    assert v2.sizes == {320} and len(v2.members) == 2
    assert {m.heatmap for m in v2.members} == {"fracture_map"}
    assert {m.heatmap for m in Ensemble.load("ensemble-224").members} == {"gradcam"}


def test_v2_rows_carry_a_fracture_map_peak_and_box():
    res = predict_files(Ensemble.load("ensemble-v2"), real_images(6), progress=False)
    assert len(res.rows) == 6 and not res.errors
    for r in res.rows:
        assert 0 <= r["box_x0"] <= r["peak_x"] <= r["box_x1"] <= 1
        assert 0 <= r["box_y0"] <= r["peak_y"] <= r["box_y1"] <= 1
        assert 0 < r["box_score"] <= 1  # the fracture map's peak, a per-cell probability
