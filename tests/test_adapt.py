"""``bonefrac adapt``: a real site shift inside the canonical data, and recalibration only."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from helpers import SHARED_DATA, SHIPPED_V2, TEST_DATA, load_benchmark

from bonefrac.training.adapt import adapt
from bonefrac.utils import sha256_file

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data set not present")



@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    """A parent trained (64 px, one MobileNetV2) on 200 images without a single humerus
    fracture, adapted on 180 images of humerus fractures and unseen non-fractured images."""
    out = tmp_path_factory.mktemp("shift")
    bench = load_benchmark("adapt_site")
    return out, bench.shift_experiment(SHARED_DATA, out, size=64, n_base=200, n_site=180)


@needs_data
@pytest.mark.slow
def test_adaptation_improves_the_unseen_region(shift):
    out, res = shift
    assert res["val_auc"]["adapted"] > res["val_auc"]["parent"] + 0.02, res
    meta = json.loads((out / "adapted" / "ensemble_meta.json").read_text())
    assert meta["parent"]["model_id"] == "parent-no-humerus"
    assert meta["parent"]["meta_sha256"] == sha256_file(out / "parent" / "ensemble_meta.json")
    site = out / "data" / "site"
    assert meta["site"]["n_files"] == 180
    assert meta["site"]["manifest_csv_sha256"] == sha256_file(site / "manifest.csv")
    assert meta["adapt"]["mode"] == "fine-tune" and meta["domain_gate"]["n_train"] == "108"
    # warm start, not ImageNet: the adapted member moved away from the parent's weights
    assert meta["members"][0]["weights_sha256"] != json.loads(
        (out / "parent" / "ensemble_meta.json").read_text())["members"][0]["weights_sha256"]
    cmp = (out / "adapted" / "Results" / "comparison.md").read_text()
    assert "parent-no-humerus" in cmp and "paired stratified bootstrap" in cmp


@needs_data
@pytest.mark.slow
def test_recalibrate_only_keeps_weights_and_refits(shift, tmp_path, capsys):
    from bonefrac.cli.main import main

    out, _ = shift
    site = out / "data" / "site"
    new = tmp_path / "recal"
    assert main(["adapt", "--model", str(out / "parent"), "--data", str(site), "--out",
                 str(new), "--recalibrate-only"]) == 0
    printed = capsys.readouterr().out
    assert "AUC difference (adapted - parent)" in printed
    parent = json.loads((out / "parent" / "ensemble_meta.json").read_text())
    meta = json.loads((new / "ensemble_meta.json").read_text())
    for a, b in zip(parent["members"], meta["members"], strict=True):
        assert sha256_file(new / b["onnx"]) == a["onnx_sha256"]  # weights untouched
        assert b["temperature"] != a["temperature"]  # refitted on the site's validation
    assert meta["fitted_on"]["data"] == str(site) and meta["adapt"]["mode"] == "recalibrate-only"
    assert meta["domain_gate"]["sha256"] != parent["domain_gate"]["sha256"]
    assert (new / "Results" / "metrics.json").is_file()


def test_adapt_refuses_a_site_it_cannot_evaluate(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(TEST_DATA, site)
    with open(site / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # every non-fractured test image moves to train: test has one class
        if r["split"] == "test" and r["label"] == "non_fractured":
            r["split"] = "train"
    with open(site / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="the test split needs fractured and non_fractured"):
        adapt(SHIPPED_V2, site, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="parent model's folder"):
        adapt(SHIPPED_V2, TEST_DATA, SHIPPED_V2)
