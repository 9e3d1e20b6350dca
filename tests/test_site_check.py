"""``bonefrac site-check`` on real radiographs, on a folder that is mostly not radiographs,
and (where the shared data is here) on 60 images of the FracAtlas site."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import ROOT, SHIPPED_V2, TEST_DATA, real_images
from PIL import Image

from bonefrac.cli.main import main
from bonefrac.evaluation.site_check import check_site, ks_distance

FRACATLAS = ROOT.parent / "shared" / "data" / "fracatlas-site"


def test_ks_distance_matches_scipy():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.beta(2, 5, 200), rng.beta(3, 3, 90)
    assert ks_distance(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-4)
    assert ks_distance(a, a) == 0.0


def test_site_of_training_like_radiographs_can_be_used_after_a_check(tmp_path, capsys):
    out = tmp_path / "check"
    assert main(["site-check", str(TEST_DATA), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "28 file(s): 28 predicted, 0 unreadable" in printed
    assert "advice: USE AS IS, AFTER A CHECK" in printed
    res = json.loads((out / "site_check.json").read_text())
    assert res["flagged"]["learned_share"] <= 0.05 and res["reference"]["n"] == 169
    page = (out / "site_check.html").read_text()
    assert "<svg" in page and "Advice: use as is" in page


def test_mostly_not_radiographs_is_out_of_scope(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for i, f in enumerate(real_images(6)):  # tinted copies: colour photos of radiographs
        g = np.asarray(Image.open(f).convert("L"), np.float64)
        rgb = np.stack([g, g * 0.6, g * 0.2], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(site / f"photo{i}.png")
    shutil.copy(real_images()[10], site / "xray.jpg")
    (site / "notes.jpg").write_text("not an image\n")
    res = check_site(SHIPPED_V2, site, progress=False)
    assert res["n_images"] == 8 and res["n_predicted"] == 7
    assert res["unreadable"][0]["file"].endswith("notes.jpg")
    assert res["flagged"]["reasons"]["colour image"] == 6
    assert res["advice"]["verdict"] == "out of scope"


@pytest.mark.skipif(not FRACATLAS.exists(), reason="fracatlas-site not present")
def test_fracatlas_site_calls_for_adaptation(tmp_path):
    """60 images of other hospitals (every fifth of the site folder): most are flagged (59%
    of all 300 with the shipped v2), and the advice is to adapt."""
    site = tmp_path / "site"
    for f in sorted(FRACATLAS.rglob("*.jpg"))[::5]:
        (site / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, site / f.parent.name / f.name)
    res = check_site(SHIPPED_V2, site, progress=False)
    assert res["n_predicted"] == 60
    assert res["flagged"]["learned_share"] > 0.25, res["flagged"]
    assert res["advice"]["verdict"] == "adapt"
