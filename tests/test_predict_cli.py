"""``bonefrac predict``: outputs, per-file errors, exit codes, interruption and ``--resume``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, real_images

from bonefrac.cli.main import main


def _predict(*args) -> int:
    return main(["predict", *map(str, args), "--quiet"])


def _outputs(out: Path) -> tuple[dict, list[dict], list[dict]]:
    """predictions.json, and the rows of predictions.csv and errors.csv (all must parse)."""
    data = json.loads((out / "predictions.json").read_text())
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    return data, rows, errors


@pytest.fixture
def mixed_folder(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    """Real radiographs (one in a subfolder) next to broken files: (folder, good, bad)."""
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    good = [d / f"img{i}.jpg" for i in range(4)] + [d / "sub" / "deep.jpg"]
    for src, dst in zip(real_images(5), good, strict=True):
        shutil.copy(src, dst)
    bad = [d / "truncated.jpg", d / "notes.png", d / "empty.jpg"]
    bad[0].write_bytes(real_images(1)[0].read_bytes()[:500])
    bad[1].write_text("not an image\n")
    bad[2].write_bytes(b"")
    (d / "readme.txt").write_text("ignored: not an image suffix\n")
    shutil.copy(real_images(1)[0], d / ".hidden.jpg")  # hidden files are skipped
    return d, good, bad


def test_mixed_folder_keeps_good_results_and_lists_bad_files(tiny_ensemble, mixed_folder,
                                                            tmp_path, capsys):
    folder, good, bad = mixed_folder
    out = tmp_path / "out"
    assert _predict(folder, "--model", tiny_ensemble, "--out", out) == 3
    data, rows, errors = _outputs(out)
    assert sorted(r["file"] for r in rows) == sorted(map(str, good))
    assert sorted(e["file"] for e in errors) == sorted(map(str, bad))
    assert all(e["reason"] for e in errors)
    assert data["complete"] is True and data["n_ok"] == 5 and data["n_failed"] == 3
    assert [r["file"] for r in data["predictions"]] == [r["file"] for r in rows]
    members = list(data["fusion_weights"])
    for r in data["predictions"]:
        assert 0 <= r["prob_fractured"] <= 1 and r["decision"] in ("fractured", "non_fractured")
        assert all(f"prob_{m}" in r for m in members)
        assert r["model_id"] == data["model_id"] and r["warning"] == ""
        # confidence: the calibrated probability of the stated decision
        p = r["prob_fractured"]
        assert r["confidence"] == pytest.approx(p if r["decision"] == "fractured" else 1 - p)
    err = capsys.readouterr().err
    for f in bad:  # one line per bad file, naming it, and no traceback
        assert sum(str(f) in line for line in err.splitlines()) == 1
    assert "Traceback" not in err


def test_exit_0_for_files_listed_directly(tiny_ensemble, tmp_path):
    files = real_images(3)
    assert _predict(*files, "--model", tiny_ensemble, "--out", tmp_path / "o") == 0
    data, rows, errors = _outputs(tmp_path / "o")
    assert [r["file"] for r in rows] == sorted(map(str, files), key=lambda f: Path(f).parts)
    assert errors == [] and data["n_failed"] == 0


def test_bad_model_exits_1_before_any_output(tmp_path, capsys):
    (tmp_path / "nomodel").mkdir()
    assert _predict(real_images(1)[0], "--model", tmp_path / "nomodel",
                    "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "not a bonefrac model" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_tampered_model_exits_1(tiny_ensemble, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_ensemble, model)
    onnx = next(model.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    assert _predict(real_images(1)[0], "--model", model, "--out", tmp_path / "o") == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_unwritable_output_is_reported_before_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # The model is bad too: the output folder must be the first thing checked.
    t = time.monotonic()
    assert _predict(real_images(1)[0], "--model", tmp_path / "missing_model",
                    "--out", blocker / "sub") == 1
    err = capsys.readouterr().err
    assert f"output folder {blocker / 'sub'} is not writable" in err and "Traceback" not in err
    assert time.monotonic() - t < 5


def test_bad_shard_is_a_usage_error(tiny_ensemble, tmp_path):
    with pytest.raises(SystemExit) as e:
        _predict(real_images(1)[0], "--model", tiny_ensemble, "--shard", "4/3")
    assert e.value.code == 2


def test_output_inside_input_folder_is_not_reread(tiny_ensemble, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in real_images(3):
        shutil.copy(f, folder / f.name)
    out = folder / "results"
    for _ in range(2):  # the second run must not predict the first run's heat-map PNGs
        assert _predict(folder, "--model", tiny_ensemble, "--out", out, "--explain") == 0
    data, rows, _ = _outputs(out)
    assert len(rows) == 3 and all(Path(r["heatmap"]).is_file() for r in data["predictions"])


def test_resume_refuses_another_model(tiny_ensemble, tmp_path, capsys):
    out = tmp_path / "o"
    assert _predict(*real_images(2), "--model", tiny_ensemble, "--out", out) == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_ensemble, other)
    meta = json.loads((other / "ensemble_meta.json").read_text())
    meta["threshold"] = 0.123
    (other / "ensemble_meta.json").write_text(json.dumps(meta))
    assert _predict(*real_images(3), "--model", other, "--out", out, "--resume") == 1
    assert "cannot resume" in capsys.readouterr().err


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no checkpoint written"
        time.sleep(0.002)


def test_sigterm_leaves_valid_outputs_and_resume_completes(tiny_ensemble, tmp_path):
    folder = tmp_path / "sixty"
    folder.mkdir()
    imgs = real_images()
    for i in range(60):
        shutil.copy(imgs[i % len(imgs)], folder / f"case{i:03d}.jpg")
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "-m", "bonefrac", "predict", str(folder), "--model", str(tiny_ensemble),
           "--out", str(out), "--batch-size", "4", "--workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    _wait_for(out / "predictions.json", proc)
    os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-run, as after a hard kill: files are valid
    data, rows, _ = _outputs(out)
    assert data["complete"] is False and 4 <= data["n_ok"] < 60
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    data, rows, errors = _outputs(out)
    n_done = data["n_ok"]
    assert data["complete"] is False and 4 <= n_done < 60
    assert data["n_pending"] == 60 - n_done and len(rows) == n_done and errors == []
    assert [r["file"] for r in rows] == [r["file"] for r in data["predictions"]]

    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {n_done} of 60" in r.stderr
    assert _predict(folder, "--model", tiny_ensemble, "--out", ref) == 0
    resumed, uninterrupted = _outputs(out), _outputs(ref)
    assert resumed[0]["complete"] is True and resumed[0]["n_ok"] == 60
    assert resumed[0]["predictions"] == uninterrupted[0]["predictions"]
    assert resumed[1] == uninterrupted[1]  # the CSV rows too
