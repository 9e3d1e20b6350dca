"""External validation: ``bonefrac evaluate --split all`` on an arbitrary labelled folder
(no manifest) uses the model's stored, validation-chosen threshold and says so."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST_DATA

from bonefrac.cli.main import main
from bonefrac.evaluation.evaluate import YOLO_CLASS_NAMES
from bonefrac.evaluation.thresholds import choose_threshold

# Real images of tests/data (by name prefix) and their real `yolo_classes` (from the shared
# set's groups.csv).
IMAGES = {
    "fractured/image1_1002_png": "6",
    "fractured/image1_1021_png": "5",
    "fractured/image1_1036_png": "1",
    "fractured/image1_1041_png": "0",
    "fractured/image1_1284_png": "2",
    "fractured/image1_1392_png": "1",
    "non_fractured/image1_0_png": "",
    "non_fractured/image1_1008_png": "",
    "non_fractured/image1_1070_png": "",
    "non_fractured/image1_1134_png": "",
}


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> Path:
    """A labelled folder under new names, no manifest.csv, one unreadable file, groups.csv."""
    root = tmp_path_factory.mktemp("external")
    rows = []
    for i, (rel, yolo) in enumerate(sorted(IMAGES.items())):
        (src,) = TEST_DATA.glob(f"{rel}.rf.*.jpg")  # exactly one file per prefix
        cls = rel.split("/")[0]
        new = f"{cls}/site_b_{i:03d}.jpg"
        (root / cls).mkdir(exist_ok=True)
        shutil.copy(src, root / new)
        rows.append({"path": new, "group_id": f"g{i}", "yolo_classes": yolo})
    (root / "fractured" / "site_b_broken.jpg").write_bytes(b"\xff\xd8 truncated, not a JPEG")
    with open(root / "groups.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "group_id", "yolo_classes"])
        w.writeheader()
        w.writerows(rows)
    assert not (root / "manifest.csv").exists()
    return root


def _evaluate(model: Path, data: Path, out: Path, *extra: str) -> dict:
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--split", "all",
                 "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_external_validation_uses_stored_threshold(tiny_ensemble, external, tmp_path, capsys):
    meta = json.loads((tiny_ensemble / "ensemble_meta.json").read_text())
    res = _evaluate(tiny_ensemble, external, tmp_path / "res")
    out = capsys.readouterr().out
    assert "all images as test" in out and "AUC" in out

    assert res["n"] == len(IMAGES)  # every readable image is test; the broken one is skipped
    assert len(res["skipped"]) == 1 and res["skipped"][0]["reason"]
    assert res["skipped"][0]["file"].endswith("fractured/site_b_broken.jpg")
    assert "external validation" in res["split_source"]
    assert res["threshold"] == meta["threshold"] and not res["threshold_refit_on_this_data"]
    m = res["metrics"]
    assert m["threshold"] == meta["threshold"]
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "roc_auc"):
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi, key
    for name, op in res["operating_points"].items():
        assert op["threshold"] == meta["operating_points"][name]["threshold"]
        assert op["metrics"]["threshold"] == op["threshold"]
    note = (tmp_path / "res" / "threshold_note_ensemble.txt").read_text()
    assert f"threshold = {meta['threshold']:.4f}" in note
    assert "VALIDATION split" in note and "never used to choose it" in note
    assert "RE-TUNED" not in note


def test_refit_threshold_is_stated(tiny_ensemble, external, tmp_path):
    meta = json.loads((tiny_ensemble / "ensemble_meta.json").read_text())
    res = _evaluate(tiny_ensemble, external, tmp_path / "res", "--refit-threshold")
    assert res["threshold_refit_on_this_data"] is True
    preds = json.loads((tmp_path / "res" / "predictions.json").read_text())
    y = np.array([p["label"] for p in preds])
    prob = np.array([p["prob"] for p in preds])
    expected, _ = choose_threshold(y, prob, meta["threshold_policy"])
    assert res["threshold"] == pytest.approx(expected, abs=1e-6)
    note = (tmp_path / "res" / "threshold_note_ensemble.txt").read_text()
    assert "RE-TUNED ON THE EVALUATED DATA" in note and "optimistic" in note


def test_subgroups_by_body_region(tiny_ensemble, external, tmp_path, capsys):
    res = _evaluate(tiny_ensemble, external, tmp_path / "res", "--subgroup", "yolo_classes")
    sg = res["subgroups"]
    json.dumps(sg, allow_nan=False)  # strict JSON: not-estimable metrics are null, not NaN
    assert sg["column"] == "yolo_classes" and "not estimable" in sg["note"].lower()
    groups = sg["groups"]
    expected_regions = {YOLO_CLASS_NAMES[int(v)] for v in IMAGES.values() if v}
    assert set(groups) == expected_regions | {"(none)"}
    for name in expected_regions:
        g = groups[name]
        n = sum(YOLO_CLASS_NAMES[int(v)] == name for v in IMAGES.values() if v)
        assert g["n"] == g["n_positive"] == n and g["n_negative"] == 0
        assert g["estimable"] == ["sensitivity"]
        assert g["sensitivity"]["n"] == n and None not in g["sensitivity"]["ci95"]
        assert g["specificity"]["value"] is None and g["roc_auc"]["value"] is None
    none = groups["(none)"]
    assert none["n_positive"] == 0 and none["estimable"] == ["specificity"]
    # specificity over all regions equals the overall one; sensitivities add up
    assert none["specificity"]["k"] == res["metrics"]["specificity"]["k"]
    assert sum(groups[r]["sensitivity"]["k"] for r in expected_regions) == \
        res["metrics"]["sensitivity"]["k"]

    # the report renders the subgroup table from these results
    assert main(["report", str(tiny_ensemble), "--results", str(tmp_path / "res"),
                 "--no-card"]) == 0
    html = (tmp_path / "res" / "report.html").read_text()
    assert all(r in html for r in expected_regions) and "not estimable" in html


def test_unknown_subgroup_column_is_one_line(tiny_ensemble, external, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tiny_ensemble), "--data", str(external),
                 "--split", "all", "--out", str(tmp_path / "res"),
                 "--subgroup", "body_part"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier stderr lines are progress bars
    assert last.startswith("bonefrac evaluate: error:") and "Traceback" not in err
    assert "body_part" in last and "yolo_classes" in last
