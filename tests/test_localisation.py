"""Localisation metrics: hand-computed cases of the numpy functions, and `bonefrac evaluate` /
`bonefrac report` on a small labelled folder with a ``boxes.csv`` (real radiographs of
tests/data and their real fracture boxes from the shared set's boxes.csv)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHIPPED_ENSEMBLE, TEST_DATA
from test_report import StrictChecker

from bonefrac.cli.main import main
from bonefrac.evaluation import localisation as L
from bonefrac.evaluation.html_report import render_html
from bonefrac.evaluation.model_card import load_inputs, render_model_card

BOX = np.array([[0.2, 0.2, 0.4, 0.4]])
TOL = L.TOLERANCE


# ------------------------------------------------------------------------ pointing game
@pytest.mark.parametrize(("point", "hit"), [
    ((0.3, 0.3), True),  # inside
    ((0.2, 0.4), True),  # on a corner (edges count)
    ((0.4 + 10 / 224, 0.3), True),  # 10 px right of the box: within the 15-px tolerance
    ((0.4 + TOL, 0.3), True),  # exactly at the tolerance
    ((0.4 + 16 / 224, 0.3), False),  # 16 px right: outside
    ((0.45, 0.45), True),  # diagonal, 11 px out on both axes: the grown box is a rectangle
    ((0.3, 0.2 - 20 / 224), False),  # 20 px above
    ((0.9, 0.9), False),
])
def test_pointing_hits(point, hit):
    assert L.pointing_hits(np.array([point]), [BOX]).tolist() == [hit]


def test_pointing_hits_any_of_several_boxes():
    boxes = np.array([[0.0, 0.0, 0.1, 0.1], [0.7, 0.7, 0.9, 0.9]])
    pts = np.array([[0.8, 0.8], [0.5, 0.5], [0.05, 0.05]])
    assert L.pointing_hits(pts, [boxes] * 3).tolist() == [True, False, True]


def test_point_box_distance():
    pts = np.array([[0.3, 0.3], [0.9, 0.3], [0.7, 0.8]])
    d = L.point_box_distance(pts, [BOX] * 3)
    np.testing.assert_allclose(d, [0.0, 0.5, math.hypot(0.3, 0.4)])
    assert L.point_box_distance(np.array([[0.5, 0.5]]), [np.zeros((0, 4))])[0] == math.inf


def test_random_pointing_baseline_is_the_grown_area():
    side = 0.2 + 2 * TOL
    assert L.random_pointing_rate([BOX])[0] == pytest.approx(side * side)
    # a corner box: the grown box is clipped to the image
    corner = np.array([[0.0, 0.0, 0.1, 0.1]])
    assert L.random_pointing_rate([corner])[0] == pytest.approx((0.1 + TOL) ** 2)
    # overlapping boxes count once
    assert L.union_area(np.array([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]])) == \
        pytest.approx(0.25 + 0.25 - 0.0625)
    assert L.union_area(np.array([[0, 0, 1, 1], [0.2, 0.2, 0.3, 0.3]])) == pytest.approx(1.0)
    assert L.union_area(np.zeros((0, 4))) == 0.0


def test_random_pointing_baseline_matches_a_fine_grid():
    rng = np.random.default_rng(3)
    lo = rng.uniform(0, 0.7, (4, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.3, (4, 2))], axis=1)
    grown = L.grow_boxes(boxes, TOL)
    assert L.union_area(grown) == pytest.approx(L.box_mask(grown, 2048).mean(), abs=3e-3)


# ------------------------------------------------------------------------------ box IoU
def test_box_iou_exact():
    a = np.array([0.0, 0.0, 0.2, 0.2])
    b = np.array([[0.1, 0.0, 0.3, 0.2],  # inter 0.02, union 0.06: 1/3
                  [0.15, 0.0, 0.35, 0.2],  # inter 0.01, union 0.07: 1/7
                  [0.0, 0.0, 0.2, 0.2],  # identical
                  [0.5, 0.5, 0.6, 0.6]])  # disjoint
    np.testing.assert_allclose(L.box_iou(a, b), [1 / 3, 1 / 7, 1.0, 0.0])
    assert L.box_iou(np.zeros(4), np.zeros((1, 4)))[0] == 0.0  # no area: 0, not NaN


def test_box_hits_at_the_threshold():
    gt = [np.array([[0.1, 0.0, 0.3, 0.2], [0.8, 0.8, 0.9, 0.9]]),
          np.array([[0.15, 0.0, 0.35, 0.2]])]
    pred = np.array([[0.0, 0.0, 0.2, 0.2]] * 2)
    np.testing.assert_allclose(L.best_iou(pred, gt), [1 / 3, 1 / 7])
    assert L.box_hits(pred, gt).tolist() == [True, False]


def test_box_baselines():
    gt = [np.array([[0.0, 0.0, 0.2, 0.4]]), np.array([[0.5, 0.5, 0.7, 0.9], [0, 0, 0.4, 0.8]])]
    assert L.baseline_box_size(gt) == pytest.approx((0.2, 0.4))
    np.testing.assert_allclose(L.centred_box((0.2, 0.4)), [0.4, 0.3, 0.6, 0.7])
    cand = L.random_box_placements((0.2, 0.4), grid=16)
    assert cand.shape == (256, 4) and cand.min() >= 0 and cand.max() <= 1
    np.testing.assert_allclose(cand[:, 2] - cand[:, 0], 0.2)
    np.testing.assert_allclose(cand[:, 3] - cand[:, 1], 0.4)
    # a box as big as the image: every placement is the image itself
    assert L.random_box_rate([np.array([[0, 0, 1, 1]])], (1.0, 1.0))[0] == 1.0
    # a half-width box: IoU >= 0.3 unless the placement overlaps it by < ~46% of its width
    rate = L.random_box_rate([np.array([[0, 0, 0.5, 1]])], (0.5, 1.0))[0]
    assert 0.4 < rate < 0.7


# ------------------------------------------------------------------------- map mass
def test_mass_inside_known_support():
    m = np.zeros((1, 224, 224), np.float32)
    m[0, :112, :112] = 2.0  # the top-left quarter, any scale
    assert L.mass_inside(m, [np.array([[0, 0, 0.5, 0.5]])])[0] == pytest.approx(1.0)
    assert L.mass_inside(m, [np.array([[0, 0, 0.25, 0.5]])])[0] == pytest.approx(0.5)
    assert L.mass_inside(m, [np.array([[0.5, 0.5, 1, 1]])])[0] == pytest.approx(0.0)
    # two overlapping boxes: the union, not the sum
    two = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.25, 0.25]])
    assert L.mass_inside(m, [two])[0] == pytest.approx(1.0)
    assert L.mass_inside(np.zeros((1, 7, 7)), [BOX])[0] == 0.0  # no mass: 0
    # a coarse map: bilinear upsampling keeps the mass of a constant map uniform
    assert L.mass_inside(np.ones((1, 7, 7)), [np.array([[0, 0, 0.5, 0.5]])])[0] == \
        pytest.approx(0.25)


def test_mass_baselines():
    full, left = np.array([[0, 0, 1, 1]]), np.array([[0, 0, 0.5, 1]])
    centre, uniform = L.baseline_mass([full, left, np.array([[0, 0, 0.5, 0.5]])])
    np.testing.assert_allclose(uniform, [1.0, 0.5, 0.25])
    np.testing.assert_allclose(centre[:2], [1.0, 0.5])  # symmetry of the centred Gaussian
    assert centre[2] == pytest.approx(0.25)
    # a small central box holds more of the Gaussian's mass than its area
    c, u = L.baseline_mass([np.array([[0.4, 0.4, 0.6, 0.6]])])
    assert c[0] > 2 * u[0]


# ---------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci():
    v = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], float)
    lo, hi = L.bootstrap_mean_ci(v)
    assert lo <= v.mean() <= hi and 0 <= lo < hi <= 1
    assert L.bootstrap_mean_ci(v).tolist() == [lo, hi]  # fixed seed
    np.testing.assert_allclose(L.bootstrap_mean_ci(np.full(5, 0.3)), [0.3, 0.3])
    both = L.bootstrap_mean_ci(np.stack([v, 1 - v], 1))  # paired: same resamples
    np.testing.assert_allclose(both[:, 1], 1 - both[::-1, 0])
    assert np.isnan(L.bootstrap_mean_ci(np.zeros(0))).all()


# ------------------------------------------------------------------ the whole dictionary
def test_localisation_metrics_and_worst_misses():
    gt = [BOX] * 4 + [np.array([[0.6, 0.6, 0.8, 0.8], [0.1, 0.1, 0.2, 0.2]])]
    peaks = np.array([[0.3, 0.3], [0.9, 0.3], [0.45, 0.3], [0.7, 0.8], [0.15, 0.15]])
    pred = np.array([[0.2, 0.2, 0.4, 0.4], [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 1, 1],
                     [0.0, 0.0, 1.0, 1.0], [0.6, 0.6, 0.8, 0.8]])
    maps = np.zeros((5, 224, 224), np.float32)
    maps[:, 50:80, 50:80] = 1.0  # inside BOX for the first four
    r = L.localisation_metrics(peaks, pred, maps, gt, n_boot=500)
    json.dumps(r, allow_nan=False)  # strict JSON
    assert r["n_images"] == 5 and r["n_boxes"] == 6
    pg, bh, ms = r["pointing_game"], r["box_hit_rate"], r["mass_inside"]
    assert pg["k"] == 3 and pg["value"] == pytest.approx(0.6) and pg["n"] == 5
    # IoUs: 1, 1/7 (0.01 / 0.07), 0, 0.04, 1
    assert bh["k"] == 2 and r["per_image"]["best_iou"][1] == pytest.approx(1 / 7)
    assert r["per_image"]["mass_inside"][:4] == pytest.approx([1.0] * 4)
    assert r["per_image"]["mass_inside"][4] == 0.0
    for e in (pg, bh, ms):
        assert e["ci95"][0] <= e["value"] <= e["ci95"][1]
        assert set(e["baselines"]) == {"centre", "random"}
        for b in e["baselines"].values():
            assert b["ci95"][0] <= b["value"] <= b["ci95"][1] and b["definition"]
    assert pg["baselines"]["centre"]["value"] == 0.0
    assert pg["baselines"]["random"]["value"] == pytest.approx(
        np.mean(L.random_pointing_rate(gt)))
    assert bh["baseline_box_size"] == pytest.approx([0.2, 0.2])
    # misses farthest first: image 1 at 0.5, image 3 at hypot(0.3, 0.4) = 0.5 -> image order
    assert [w["index"] for w in r["worst_misses"]] == [1, 3]
    assert r["worst_misses"][0]["distance"] == pytest.approx(0.5)
    assert [w["index"] for w in L.localisation_metrics(peaks, pred, maps, gt, n_boot=10,
                                                       n_worst=1)["worst_misses"]] == [1]


def test_localisation_metrics_needs_boxes():
    with pytest.raises(ValueError, match="at least one image"):
        L.localisation_metrics(np.zeros((0, 2)), np.zeros((0, 4)), np.zeros((0, 7, 7)), [])
    with pytest.raises(ValueError, match="every scored image"):
        L.localisation_metrics(np.zeros((1, 2)), np.zeros((1, 4)), np.zeros((1, 7, 7)),
                               [np.zeros((0, 4))])


# ---------------------------------------------- `bonefrac evaluate` and `bonefrac report`
# Real fracture boxes of tests/data images (from the shared set's boxes.csv, by name prefix).
BOXES = {
    "fractured/image1_1002_png": [(0.42779, 0.53164, 0.54884, 0.59003),
                                  (0.44661, 0.43470, 0.58721, 0.52448)],
    "fractured/image1_1021_png": [(0.23391, 0.38516, 0.41205, 0.52677)],
    "fractured/image1_1022_png": [(0.24230, 0.56155, 0.55241, 0.68794)],
    "fractured/image1_1036_png": [(0.38523, 0.22280, 0.52342, 0.32133)],
    "fractured/image1_1041_png": [(0.50203, 0.56517, 0.64936, 0.67205)],
    "fractured/image1_1284_png": [(0.71597, 0.05632, 0.86570, 0.17198)],
    "fractured/image1_1392_png": [(0.45030, 0.25637, 0.64448, 0.31733)],
}
NO_BOX = ["fractured/image1_1044_png", "non_fractured/image1_0_png",
          "non_fractured/image1_1008_png", "non_fractured/image1_1070_png"]


def _copy(rel: str, root: Path) -> str:
    (src,) = TEST_DATA.glob(f"{rel}.rf.*.jpg")
    dst = root / rel.split("/")[0] / src.name
    dst.parent.mkdir(exist_ok=True)
    shutil.copy(src, dst)
    return f"{rel.split('/')[0]}/{src.name}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """The same labelled images twice: with a boxes.csv (extra column, one fractured image
    without a box) and without one."""
    with_boxes = tmp_path_factory.mktemp("with_boxes")
    rows = []
    for rel, boxes in BOXES.items():
        name = _copy(rel, with_boxes)
        rows += [{"path": name, "class_name": "x", "x0": b[0], "y0": b[1], "x1": b[2],
                  "y1": b[3]} for b in boxes]
    for rel in NO_BOX:
        _copy(rel, with_boxes)
    with open(with_boxes / "boxes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "class_name", "x0", "y0", "x1", "y1"])
        w.writeheader()
        w.writerows(rows)
    without = tmp_path_factory.mktemp("without_boxes")
    shutil.copytree(with_boxes, without, dirs_exist_ok=True)
    (without / "boxes.csv").unlink()
    return with_boxes, without


def _evaluate(data: Path, out: Path) -> dict:
    assert main(["evaluate", "--model", str(SHIPPED_ENSEMBLE), "--data", str(data),
                 "--split", "all", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def evaluated(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("res_boxes")
    _evaluate(folders[0], out)
    return out


def test_evaluate_writes_localisation(evaluated):
    m = json.loads((evaluated / "metrics.json").read_text())
    loc = m["localisation"]
    assert loc["n_images"] == len(BOXES)  # fractured images with a box only
    assert loc["n_boxes"] == sum(len(b) for b in BOXES.values())
    for key in L.METRICS:
        e = loc[key]
        assert 0 <= e["value"] <= 1 and e["n"] == len(BOXES)
        assert e["ci95"][0] <= e["value"] <= e["ci95"][1]
        assert {"centre", "random"} <= set(e["baselines"])
    assert "per_image" not in loc  # per-image records are in localisation.json
    full = json.loads((evaluated / "localisation.json").read_text())
    assert len(full["images"]) == len(BOXES)
    assert {Path(r["file"]).name.split(".rf.")[0] for r in full["images"]} == \
        {k.split("/")[1] for k in BOXES}
    for r in full["images"]:
        assert len(r["peak"]) == 2 and len(r["box"]) == 4 and r["boxes"]
        assert isinstance(r["pointing_hit"], bool)
    assert full["pointing_game"]["k"] == sum(r["pointing_hit"] for r in full["images"])
    # the gallery: one PNG per listed miss, farthest first
    misses = loc["worst_misses"]
    assert len(misses) == len(BOXES) - loc["pointing_game"]["k"]
    assert [w["distance"] for w in misses] == sorted((w["distance"] for w in misses),
                                                     reverse=True)
    pngs = sorted((evaluated / "localisation_misses").glob("*.png"))
    assert [evaluated / w["png"] for w in misses] == pngs
    for p in pngs:
        assert p.read_bytes().startswith(b"\x89PNG")


def test_report_and_card_show_localisation(evaluated):
    inp = load_inputs(SHIPPED_ENSEMBLE, evaluated)
    html, warnings = render_html(inp)
    assert not warnings
    checker = StrictChecker()
    checker.feed(html)
    checker.close()
    assert not checker.errors and not checker.stack  # balanced, self-contained
    assert "<h2>Localisation</h2>" in html and "Pointing game" in html
    assert "Box hit rate" in html and "Heat-map mass inside boxes" in html
    assert "centre baseline" in html and "random baseline" in html
    n_miss = len(inp.metrics["localisation"]["worst_misses"])
    assert len(inp.localisation_misses) == n_miss
    if n_miss:
        assert "Worst misses" in html
        assert html.count("data:image/png;base64,") >= n_miss
    card = render_model_card(inp)
    assert "### Localisation" in card and "| Pointing game" in card
    assert "random baseline" in card and "Localisation was checked against" in card
    assert "Image-level labels only" not in card


def test_without_boxes_no_localisation(folders, tmp_path):
    m = _evaluate(folders[1], tmp_path / "res")
    assert "localisation" not in m
    assert not (tmp_path / "res" / "localisation.json").exists()
    assert not (tmp_path / "res" / "localisation_misses").exists()
    inp = load_inputs(SHIPPED_ENSEMBLE, tmp_path / "res")
    html, _ = render_html(inp)
    card = render_model_card(inp)
    assert "Localisation" not in html and "### Localisation" not in card
    assert "Image-level labels only" in card


def test_bad_boxes_csv_fails_before_the_model_runs(folders, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(folders[0], bad)
    (bad / "boxes.csv").write_text("path,x0,y0,x1,y1\nfractured/a.jpg,0.5,0.1,0.2,0.3\n")
    assert main(["evaluate", "--model", str(SHIPPED_ENSEMBLE), "--data", str(bad),
                 "--split", "all", "--out", str(tmp_path / "res")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "boxes.csv:2" in last and "Traceback" not in last
    assert not (tmp_path / "res" / "metrics.json").exists()
