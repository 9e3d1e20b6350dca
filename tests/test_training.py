"""A short real training run writes every artifact; --resume continues an interrupted run."""

import csv
import json

import numpy as np
import pytest
from conftest import TEST_DATA, TINY_SIZE
from PIL import Image

from bonefrac.training import TrainConfig, train

RESULTS = ["accuracy.png", "loss.png", "confusion_matrix.png", "roc_curve.png",
           "classification_report.txt", "clinical_metrics.txt", "threshold_note.txt",
           "metrics.json", "reliability_diagram.png", "threshold_robustness.png"]


def test_run_writes_every_artifact(tiny_runs):
    run = tiny_runs["mobilenetv2"]
    for name in ["model.safetensors", "model.json", "history.json", "history.csv",
                 "config.json"]:
        assert (run / name).stat().st_size > 0
    res = run / "Results"
    for name in RESULTS:
        f = res / name
        assert f.stat().st_size > 0, name
        if f.suffix == ".png":
            with Image.open(f) as im:
                im.verify()
    m = json.loads((res / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] == 6
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "roc_auc"):
        assert len(m["metrics"][key]["ci95"]) == 2
    assert "VALIDATION" in (res / "threshold_note.txt").read_text()
    assert "fractured" in (res / "classification_report.txt").read_text()
    text = (res / "clinical_metrics.txt").read_text()
    for word in ("Sensitivity", "Specificity", "PPV", "NPV", "ROC-AUC", "TP=", "FN="):
        assert word in text
    hist = list(csv.DictReader((run / "history.csv").read_text().splitlines()))
    assert [h["stage"] for h in hist] == ["frozen", "finetune"]
    mj = json.loads((run / "model.json").read_text())
    assert 0 < mj["threshold"] < 1 and mj["fitted_on"]["val_n"] == 6
    assert set(mj["operating_points"]) == {"triage", "confirmation"}


def _cfg(**kw):
    base = dict(epochs_frozen=2, epochs_finetune=2, views=2, size=TINY_SIZE, batch_size=16,
                patience=10)
    return TrainConfig(**{**base, **kw})


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    full = train(TEST_DATA, tmp_path / "full", _cfg(), finalize=False)
    # interrupt the second run during its 2nd fine-tuning epoch
    import bonefrac.training.trainer as trainer

    real = trainer._save_checkpoint
    calls = {"n": 0}

    def crash_after_three(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # frozen 1, frozen 2, finetune 1 saved
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_checkpoint", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train(TEST_DATA, tmp_path / "resumed", _cfg(), finalize=False)
    monkeypatch.setattr(trainer, "_save_checkpoint", real)
    with pytest.raises(FileExistsError):  # a checkpointed run is not silently overwritten
        (tmp_path / "resumed" / "model.json").write_text("{}")
        train(TEST_DATA, tmp_path / "resumed", _cfg(), finalize=False)
    (tmp_path / "resumed" / "model.json").unlink()
    train(TEST_DATA, tmp_path / "resumed", _cfg(), resume=True, finalize=False)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
    np.testing.assert_allclose([h["val_loss"] for h in ha], [h["val_loss"] for h in hb],
                               atol=1e-5)
    np.testing.assert_allclose([h["lr"] for h in ha], [h["lr"] for h in hb])  # schedule resumed


def test_late_views_skip_pooled_features_and_one_cycle_decays(tmp_path, monkeypatch):
    from bonefrac.training.trainer import STAGE1_VIEWS

    monkeypatch.setenv("BONEFRAC_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(views=STAGE1_VIEWS + 1, epochs_frozen=1, epochs_finetune=3)
    run = train(TEST_DATA, tmp_path / "run", cfg, finalize=False)
    (feats,) = (tmp_path / "cache" / "features").iterdir()
    last = STAGE1_VIEWS  # the first view that stage 1 does not use
    assert (feats / f"train_view{last}_act.npy").exists()
    assert not (feats / f"train_view{last}_pooled.npy").exists()
    assert (feats / f"train_view{last - 1}_pooled.npy").exists()
    hist = json.loads((run / "history.json").read_text())
    lrs = [h["lr"] for h in hist if h["stage"] == "finetune"]
    assert len(lrs) == 3 and cfg.lr_finetune >= lrs[0] > lrs[1] > lrs[2]
    assert lrs[2] < 1e-3 * cfg.lr_finetune  # annealed to ~0 at the end
