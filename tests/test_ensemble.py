"""Fusion arithmetic, meta edits, ensemble-fit artifacts."""

import json
import shutil

import numpy as np
import pytest
from helpers import real_images

from bonefrac.data.io import load_gray
from bonefrac.evaluation.calibration import calibrated_prob
from bonefrac.evaluation.fitting import weight_grid
from bonefrac.inference import Ensemble, fuse

ENSEMBLE_RESULTS = ["mobilenetv2_accuracy.png", "mobilenetv2_loss.png",
                    "efficientnet_lite0_accuracy.png", "efficientnet_lite0_loss.png",
                    "confusion_matrix_ensemble.png", "roc_curve_ensemble.png",
                    "classification_report_ensemble.txt", "clinical_metrics_ensemble.txt",
                    "threshold_note_ensemble.txt", "metrics.json", "comparison.md"]


def test_fuse_is_the_weighted_mean():
    p = {"a": np.array([0.1, 0.9]), "b": np.array([0.5, 0.3])}
    assert fuse(p, {"a": 0.25, "b": 0.75}) == pytest.approx([0.4, 0.45])
    for bad in ({"a": 0.5, "b": 0.6}, {"a": -0.5, "b": 1.5}):
        with pytest.raises(ValueError, match="sum to 1"):
            fuse(p, bad)


def test_weight_grid_is_on_the_simplex():
    grid = weight_grid(["a", "b", "c"], step=0.25)
    assert len(grid) == 15 and all(abs(sum(w.values()) - 1) < 1e-12 for w in grid)


def test_edited_meta_weights_change_fused_probability_exactly(tiny_ensemble, tmp_path):
    ens_dir = tmp_path / "ens"
    shutil.copytree(tiny_ensemble, ens_dir)
    meta = json.loads((ens_dir / "ensemble_meta.json").read_text())
    gray = np.stack([load_gray(f, 96, "stretch") for f in real_images(5)])
    for w in (0.0, 0.3, 1.0):
        meta["members"][0]["fusion_weight"], meta["members"][1]["fusion_weight"] = w, 1 - w
        meta["members"][0]["temperature"] = 2.0
        (ens_dir / "ensemble_meta.json").write_text(json.dumps(meta))
        ens = Ensemble.load(ens_dir)
        out = ens.member_logits({96: gray})
        pa = calibrated_prob(out["mobilenetv2"][0], 2.0)
        pb = calibrated_prob(out["efficientnet_lite0"][0], meta["members"][1]["temperature"])
        pred = ens.predict_gray(gray)
        np.testing.assert_allclose(pred.prob, w * pa + (1 - w) * pb, atol=1e-12)
    meta["members"][0]["fusion_weight"] = 0.9  # 0.9 + 0.0 != 1
    (ens_dir / "ensemble_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sum to 1"):
        Ensemble.load(ens_dir)


def test_ensemble_fit_writes_the_seed_artifacts(tiny_ensemble):
    res = tiny_ensemble / "Results"
    for name in ENSEMBLE_RESULTS:
        assert (res / name).stat().st_size > 0, name
    meta = json.loads((tiny_ensemble / "ensemble_meta.json").read_text())
    assert meta["fitted_on"]["val_n"] == 6 and meta["weights_how"].startswith("equal")
    assert sum(m["fusion_weight"] for m in meta["members"]) == pytest.approx(1)
    for m in meta["members"]:
        assert len(m["weights_sha256"]) == 64 and len(m["onnx_sha256"]) == 64
        assert m["preprocessing"]["size"] == 96
    table = (res / "comparison.md").read_text()
    assert "mobilenetv2 (baseline)" in table and "| ensemble |" in table
    assert "reduces both error types" in table and "paired stratified bootstrap" in table
    m = json.loads((res / "metrics.json").read_text())
    assert set(m["members"]) == {"mobilenetv2", "efficientnet_lite0"}


def test_fit_weights_searches_validation(tiny_runs, tmp_path, monkeypatch):
    from helpers import TEST_DATA

    import bonefrac.training.fit as fit
    from bonefrac.data.dataset import load_index

    seen = []
    real_collect = fit.collect
    monkeypatch.setattr(fit, "collect", lambda ens, samples, desc: (
        seen.append({s.split for s in samples}), real_collect(ens, samples, desc))[1])
    res = fit.fit_ensemble([tiny_runs["mobilenetv2"], tiny_runs["efficientnet_lite0"]],
                           load_index(TEST_DATA), tmp_path / "e", fit_weights="logloss",
                           export_onnx=False)
    assert seen == [{"val"}]  # fitting collected only validation images
    meta = json.loads((tmp_path / "e" / "ensemble_meta.json").read_text())
    assert "grid search" in meta["weights_how"] and "logloss" in meta["weights_how"]
    assert res["split"] == "test"
