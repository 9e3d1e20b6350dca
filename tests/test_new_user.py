"""What a new user trips on (issue 25): each bug's regression test, and every message asserted
on the exact command that prints it. Real shipped models and real radiographs throughout."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, SHIPPED_ENSEMBLE, SHIPPED_V2, SHIPPED_V3, TEST_DATA, real_images

from bonefrac.cli.main import main
from bonefrac.inference.model_folder import PRETRAINED

NAMES = "ensemble, ensemble-v2, ensemble-224, baseline"


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the shipped models: nothing may change them)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


# ------------------------------------------------------------------------------------ bugs
def test_report_writes_beside_the_results_and_never_into_the_package(tmp_path, capsys):
    """Bug 1: `bonefrac report ensemble --results DIR` overwrote the shipped MODEL_CARD.md."""
    before = _tree_digest(PRETRAINED)
    results = Path(shutil.copytree(SHIPPED_V2 / "Results", tmp_path / "res"))
    code, out, _ = _run(capsys, "report", "ensemble", "--results", results)
    assert code == 0
    assert out.split() == ["wrote", str(results / "report.html"),
                           "wrote", str(results / "MODEL_CARD.md")]
    assert "# Model card:" in (results / "MODEL_CARD.md").read_text()
    assert _tree_digest(PRETRAINED) == before
    # without --out, the shipped results themselves are refused as a destination
    code, _, err = _run(capsys, "report", "ensemble")
    res = SHIPPED_V3 / "Results"
    assert code == 1 and err == (
        f"bonefrac report: error: {res} is inside the installed bonefrac package (a shipped "
        f"model's results: its report is {res / 'report.html'}); pass --out DIR to write a new "
        "one elsewhere\n")
    assert _tree_digest(PRETRAINED) == before


def test_predict_of_a_missing_input_exits_1_and_writes_nothing(tmp_path, capsys):
    """Bug 4: `bonefrac predict /nope` exited 3 and wrote empty CSVs."""
    out = tmp_path / "out"
    code, _, err = _run(capsys, "predict", "/nope", "--out", out)
    assert code == 1 and err == ("bonefrac predict: error: /nope does not exist (give image or "
                                 "DICOM files, or folders of them)\n")
    assert not out.exists()


def test_gallery_draws_a_letterbox_image_in_its_own_frame(tmp_path):
    """Bug 3: the worst-misses figure drew the letterboxed square, then the peak in image
    fractions, so the peak landed in the black bar. Now the bars are cropped off and the
    figure has the image's aspect: a peak at x = 0.05 lies on the image."""
    from PIL import Image

    from bonefrac.data.io import load_gray
    from bonefrac.evaluation.evaluate import image_view, write_miss_png

    f = real_images(1)[0]
    square = load_gray(f, 320, "letterbox")
    w, h = Image.open(f).size
    tall = square.T.copy()  # the same pixels as a portrait image (aspect h / w < 1)
    view = image_view(tall, h / w, "letterbox")
    assert view.shape[1] / view.shape[0] == pytest.approx(h / w, abs=0.01)
    assert view[:, :3].mean() > 10  # no black bar left at the left edge
    png = tmp_path / "miss.png"
    write_miss_png(png, view, np.zeros((10, 10), np.float32), np.array([[0.3, 0.3, 0.6, 0.6]]),
                   np.array([0.05, 0.5]), np.array([0.3, 0.3, 0.6, 0.6]), "#1")
    fig = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert fig.shape[1] == view.shape[1] and fig.shape[0] == view.shape[0] + 18
    y, x = view.shape[0] // 2, round(0.05 * view.shape[1])
    assert fig[y, x, 0] > 200 and fig[y, x, 1] < 80  # the red cross, on the image


# --------------------------------------------------------------------------------- messages
def test_unknown_model_name_says_it_does_not_exist_and_lists_the_shipped_names(tmp_path,
                                                                               capsys):
    img = real_images(1)[0]
    code, _, err = _run(capsys, "predict", img, "--model", "ensembel", "--out", tmp_path / "o")
    assert code == 1 and err == (
        "bonefrac predict: error: --model ensembel: ensembel does not exist; give a model "
        f"folder or a shipped model name ({NAMES})\n")
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "predict", img, "--model", tmp_path / "empty",
                        "--out", tmp_path / "o")
    assert code == 1 and err == (
        f"bonefrac predict: error: --model {tmp_path / 'empty'}: {tmp_path / 'empty'} is not a "
        "bonefrac model folder (no ensemble_meta.json or model.json); shipped models: "
        f"{NAMES}\n")


def test_out_that_is_a_file_says_so(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# notes\n")
    code, _, err = _run(capsys, "predict", real_images(1)[0], "--out", readme)
    assert code == 1
    assert err == f"bonefrac predict: error: --out {readme} is a file, not a folder\n"
    assert readme.read_text() == "# notes\n"


def test_evaluate_data_that_does_not_exist(capsys):
    code, _, err = _run(capsys, "evaluate", "--data", "/nope")
    assert code == 1 and err == "bonefrac evaluate: error: --data /nope does not exist\n"


def test_split_valid_is_the_manifests_word_for_val():
    from bonefrac.cli.main import build_parser

    for word in ("valid", "val", "validation", "VALID"):
        args = build_parser("evaluate").parse_args(["evaluate", "--data", "d", "--split", word])
        assert args.split == "val"
    with pytest.raises(SystemExit):
        build_parser("evaluate").parse_args(["evaluate", "--data", "d", "--split", "dev"])


def test_run_folder_with_backend_auto_says_it_takes_torch(tiny_runs, tmp_path, capsys):
    run = tiny_runs["mobilenetv2"]
    code, _, err = _run(capsys, "predict", real_images(1)[0], "--model", run,
                        "--out", tmp_path / "o", "--quiet")
    assert code == 0
    assert (f"note: {run} has no ONNX export, so --backend auto runs it with PyTorch (slow to "
            f"start); export it once: bonefrac export --model {run} --out {run}\n") in err


# ---------------------------------------------------------------------- wording and outputs
def test_confidence_is_the_probability_of_the_stated_decision():
    """P = 0.219 at threshold 0.178 is 'fractured, confidence 0.219', never 0.781."""
    from bonefrac.inference.predict import decision_confidence

    assert decision_confidence(0.219, True) == 0.219
    assert decision_confidence(0.219, False) == 0.781
    assert decision_confidence(0.9, True, uncertain=True) is None


def test_uncertain_rows_have_no_confidence():
    import bonefrac

    r = bonefrac.load("ensemble").predict(np.zeros((256, 256), np.uint8))  # blank: flagged
    assert r.decision == "uncertain" and r.warning and r.confidence is None


def test_run_summary_and_column_guide(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for f in real_images(3):
        shutil.copy(f, d)
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    np.save(tmp_path / "x.npy", np.zeros(3))  # not an input suffix: ignored
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "predict", d, "--out", out, "--explain", "--quiet")
    assert code == 3
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n = {k: sum(r["decision"] == k for r in rows) for k in ("fractured", "non_fractured",
                                                            "uncertain")}
    lines = stdout.splitlines()
    assert lines[:5] == [
        f"4 image(s): {n['fractured']} fractured, {n['non_fractured']} non_fractured, "
        f"{n['uncertain']} uncertain; 1 failed",
        f"predictions: {out}/predictions.csv (and predictions.json; columns explained in "
        f"{out}/predictions.schema.json)",
        f"detections:  {out}/detections.csv (every scored box: file, rank, score, x0, y0, x1, "
        "y1)",
        f"errors:      {out}/errors.csv (1 file(s), one reason each)",
        f"overlays:    {out}/heatmaps/ (3 PNG)"]
    assert lines[5].startswith("RESEARCH USE ONLY")
    schema = json.loads((out / "predictions.schema.json").read_text())
    assert schema["x-columns"] == list(rows[0])
    assert schema["disclaimer"].startswith("RESEARCH USE ONLY")
    for col in rows[0]:  # every column the CSV has is explained
        assert not schema["properties"][col]["description"].startswith("not described"), col


def test_every_prediction_output_says_research_use_only(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(real_images(1)[0]), "--out", str(out), "--explain",
                 "--quiet"]) == 0
    for name in ("predictions.json", "predictions.schema.json"):
        assert json.loads((out / name).read_text())["disclaimer"].startswith("RESEARCH USE")
    assert "RESEARCH USE ONLY" in capsys.readouterr().out


# ------------------------------------------------------------- evaluate prints and reports
@pytest.mark.slow
def test_evaluate_prints_rounded_cis_where_results_went_and_writes_the_report(tmp_path,
                                                                              capsys):
    """Bug 2: evaluate wrote no report.html / MODEL_CARD.md, did not say where its results
    went and printed 16-digit CIs. `--split valid` on the manifest's val images."""
    before = _tree_digest(PRETRAINED)
    out = tmp_path / "res"
    code, stdout, _ = _run(capsys, "evaluate", "--model", "ensemble-224", "--data", TEST_DATA,
                           "--split", "valid", "--out", out)
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "val" and m["n"] == 6
    mm = m["metrics"]
    ci = mm["roc_auc"]["ci95"]
    assert (f"AUC {mm['roc_auc']['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]") in stdout
    assert re.search(r"sensitivity \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", stdout)
    assert not re.search(r"\d\.\d{5,}", stdout.replace(f"t={m['threshold']:.4f}", ""))
    assert f"results -> {out}/" in stdout
    assert f"wrote {out / 'report.html'}" in stdout and f"wrote {out / 'MODEL_CARD.md'}" in stdout
    assert _tree_digest(PRETRAINED) == before


def test_evaluate_of_a_shipped_model_defaults_outside_the_package(tmp_path, monkeypatch):
    from bonefrac.evaluation.evaluate import default_results_dir, inside_package

    monkeypatch.chdir(tmp_path)
    assert inside_package(SHIPPED_ENSEMBLE) and not inside_package(tmp_path)
    assert default_results_dir(SHIPPED_ENSEMBLE) == Path("Results") / SHIPPED_ENSEMBLE.name
    assert default_results_dir(tmp_path / "run") == tmp_path / "run" / "Results"
    assert not inside_package(ROOT / "tests")


def test_studies_say_why_uncertain_and_carry_ids_only_when_asked(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from pydicom.uid import generate_uid

    from bonefrac.data.io import load_gray
    from bonefrac.testing.dicom import write_dicom

    d = tmp_path / "in"
    d.mkdir()
    study = generate_uid()
    write_dicom(d / "a.dcm", load_gray(real_images(1)[0], None), StudyInstanceUID=study,
                AccessionNumber="ACC123", PatientID="PAT9", BodyPartExamined="WRIST")
    # the same study's second image is a CT slice: the gate flags its modality
    write_dicom(d / "b.dcm", load_gray(real_images(2)[1], None), StudyInstanceUID=study,
                AccessionNumber="ACC123", PatientID="PAT9", Modality="CT")
    out = tmp_path / "out"
    assert main(["predict", str(d), "--by-study", "--out", str(out), "--quiet",
                 "--operating-point", "confirmation"]) == 0
    (row,) = json.loads((out / "studies.json").read_text())["studies"]
    assert "accession_number" not in row and "patient_id" not in row  # not unless asked
    assert row["warning"].startswith(f"{d / 'b.dcm'}: ") and "CT" in row["warning"]
    assert "ACC123" not in (out / "studies.csv").read_text()
    ids = tmp_path / "ids"
    assert main(["predict", str(d), "--by-study", "--study-ids", "--out", str(ids),
                 "--quiet"]) == 0
    with open(ids / "studies.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert list(row)[:3] == ["study_instance_uid", "accession_number", "patient_id"]
    assert (row["accession_number"], row["patient_id"]) == ("ACC123", "PAT9")
    capsys.readouterr()
    assert main(["predict", str(d), "--study-ids", "--out", str(ids)]) == 1
    assert capsys.readouterr().err == ("bonefrac predict: error: --study-ids goes with "
                                       "--by-study (it adds columns to studies.csv)\n")


def test_report_starts_with_a_plain_language_summary_and_explains_its_terms():
    from bonefrac.evaluation.html_report import GLOSSARY, render_html
    from bonefrac.evaluation.model_card import load_inputs

    inp = load_inputs(SHIPPED_V2)
    html, _ = render_html(inp)
    mm = inp.metrics["metrics"]
    miss, flag = (round(100 * (1 - mm[k]["value"])) for k in ("sensitivity", "specificity"))
    sentence = (f"On the test split ({mm['n']} images), at the default point (threshold "
                f"{mm['threshold']:.3f}) it misses about {miss} in 100 fractures and flags "
                f"about {flag} in 100 normal images as fractured")
    assert sentence in html
    assert html.index("<h2>Summary</h2>") < html.index("<h2>Metrics")
    for term, _ in GLOSSARY:
        assert html.count(f"<dt>{term}</dt>") == 1
    assert {"ECE", "Brier score, NLL", "Pointing game"} <= {t for t, _ in GLOSSARY}


def test_explain_help_and_web_page_name_the_shipped_heat_map_kind():
    from bonefrac import FRACTURE_MAP, GRADCAM
    from bonefrac.cli.main import build_parser
    from bonefrac.inference.model_folder import ModelFolder, member_heatmap

    kinds = {n: {member_heatmap(s) for s in ModelFolder.open(n).members}
             for n in ("ensemble", "ensemble-224", "baseline")}
    assert kinds == {"ensemble": {FRACTURE_MAP}, "ensemble-224": {GRADCAM},
                     "baseline": {GRADCAM}}
    sub = build_parser("predict")._subparsers._group_actions[0].choices["predict"]
    (explain,) = [a for a in sub._actions if "--explain" in a.option_strings]
    assert "the shipped ensemble: its trained fracture map" in explain.help
    assert "ensemble-224 and baseline: Grad-CAM" in explain.help
    page = (ROOT / "src/bonefrac/serving/static/index.html").read_text()
    assert "for the shipped model, its trained fracture map" in page
    assert "Grad-CAM heat map overlay" not in page
    pytest.importorskip("fastapi")
    from bonefrac.serving.app import create_app

    docs = create_app(SHIPPED_V2).description  # the text of /docs
    assert "the shipped model: its trained fracture map" in docs and "Grad-CAM heat" not in docs
