"""``bonefrac adapt``: a real site shift inside the canonical data, and recalibration only."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from helpers import SHARED_DATA, SHIPPED_V2, TEST_DATA, load_script, real_images

from bonefrac import InputError
from bonefrac.cli.adapt import summary
from bonefrac.data.dataset import load_index
from bonefrac.training.adapt import adapt, plan_fit
from bonefrac.utils import sha256_file

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data set not present")


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    """A parent trained (64 px, one MobileNetV2) on 200 images without a single humerus
    fracture, adapted on 180 images of humerus fractures and unseen non-fractured images."""
    out = tmp_path_factory.mktemp("shift")
    bench = load_script("evaluations/adapt_site.py")
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


def site_copy(tmp_path, edit) -> tuple:
    """tests/data copied to ``tmp_path/site`` with ``edit(rows)`` applied to its manifest rows
    (a row whose split becomes "" is dropped with its file); returns (site, rows)."""
    site = tmp_path / "site"
    shutil.copytree(TEST_DATA, site)
    with open(site / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    edit(rows)
    for r in [r for r in rows if not r["split"]]:
        (site / r["path"]).unlink()
    rows = [r for r in rows if r["split"]]
    with open(site / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return site, rows


def _one_class_test(rows) -> None:
    for r in rows:  # every non-fractured test image moves to train: test has one class
        if r["split"] == "test" and r["label"] == "non_fractured":
            r["split"] = "train"


def _no_test(rows) -> None:
    for r in rows:
        if r["split"] == "test":
            r["split"] = ""


def test_adapt_refuses_a_site_it_cannot_evaluate(tmp_path):
    site, _ = site_copy(tmp_path, _one_class_test)
    with pytest.raises(ValueError, match="the test split needs fractured and non_fractured"):
        adapt(SHIPPED_V2, site, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="parent model's folder"):
        adapt(SHIPPED_V2, TEST_DATA, SHIPPED_V2)


def test_recalibrate_only_on_a_site_without_test_split(tmp_path, capsys):
    """train/val only (11 + 11 images): calibration on both pooled, the parent's gate kept,
    no comparison, and the output says what was fitted on how many images."""
    import bonefrac
    from bonefrac.cli.main import main

    site, _ = site_copy(tmp_path, _no_test)
    out = tmp_path / "recal"
    assert main(["adapt", "--model", str(SHIPPED_V2), "--data", str(site), "--out", str(out),
                 "--recalibrate-only"]) == 0
    printed = capsys.readouterr().out
    assert ("temperatures, fusion weights, thresholds, operating points: training + validation "
            "splits, 22 images (11 fractured / 11 non_fractured)") in printed
    assert "comparison with the parent: none: the site has no test split" in printed
    assert "WARNING: no test split" in printed and "UNRELIABLE" in printed
    assert "the parent's gate is kept" in printed and "AUC difference" not in printed
    parent = json.loads((SHIPPED_V2 / "ensemble_meta.json").read_text())
    meta = json.loads((out / "ensemble_meta.json").read_text())
    assert meta["fitted_on"]["val_n"] == 22
    assert meta["domain_gate"]["sha256"] == parent["domain_gate"]["sha256"]
    assert meta["domain_gate"]["kept_from_parent"] == parent["model_id"]
    assert any("UNRELIABLE" in n for n in meta["adapt"]["notes"])
    res = bonefrac.load(out).predict(real_images(2))  # the adapted model loads and predicts
    assert all(0 <= r.prob_fractured <= 1 and r.domain_score is not None for r in res)


def test_near_duplicates_across_splits_are_listed_and_regrouped(tmp_path, capsys):
    """A group straddling train and val: refused with its files named; --regroup moves it
    whole, then adapt compares on the test split and the model card carries the warnings."""
    from bonefrac.cli.main import main
    from bonefrac.evaluation.model_card import limitations, load_inputs

    site, rows = site_copy(tmp_path, lambda rows: None)
    pair = [next(r for r in rows if r["split"] == sp) for sp in ("train", "val")]
    with open(site / "groups.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group_id"])
        w.writerows([r["path"], "dup" if r in pair else r["path"]] for r in rows)
    with pytest.raises(InputError, match="1 near-duplicate group.*--regroup") as e:
        load_index(site)
    assert all(r["path"] in str(e.value) for r in pair)
    index = load_index(site, regroup=True)
    assert {s.split for s in index.samples if s.group == "dup"} == {"train"}  # tie: train
    out = tmp_path / "recal"
    assert main(["adapt", "--model", str(SHIPPED_V2), "--data", str(site), "--out", str(out),
                 "--recalibrate-only", "--regroup"]) == 0
    printed = capsys.readouterr().out
    assert "site test split (n=6)" in printed and "1 near-duplicate group(s) moved" in printed
    assert "CI [+0.0000, +0.0000]" not in printed
    notes = [x for x in limitations(load_inputs(out)) if x.startswith("Site adaptation")]
    assert any("UNRELIABLE" in n for n in notes), notes


def test_zero_width_ci_is_not_reported_as_one():
    ev = {"n": 6, "metrics": {"roc_auc": {"value": 0.75}},
          "compared_with": {"models": ["new", "old"],
                            "auc_diff": {"value": 0.0, "ci95": [0.0, 0.0]},
                            "errors": {"new": {"fn": 1, "fp": 2}, "old": {"fn": 1, "fp": 2}}}}
    res = {"parent": {"model_id": "old"}, "model_id": "new", "site": {"n_files": 28},
           "seconds": 6.0, "evaluation": ev,
           "adapt": {"mode": "recalibrate-only", "fitted": {}, "notes": []}}
    text = summary(res, "X")
    assert "CI [" not in text and "no CI to report" in text


def test_fine_tune_plan_on_a_small_site_says_what_is_unreliable():
    plan = plan_fit(load_index(TEST_DATA), recalibrate_only=False, policy="sensitivity:0.95")
    assert plan.calibration == "val" and plan.gate == "none" and plan.evaluate
    assert plan.fitted["weights (fine-tuned)"] == ("training split, 16 images (8 fractured / 8 "
                                                   "non_fractured)")
    text = " ".join(plan.notes)
    assert "fitted on only 6 images" in text and "UNRELIABLE" in text
    assert "NO learned domain check" in text
