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


@pytest.mark.parametrize(("extra", "crash_at"), [
    ({}, 3),  # frozen 1, frozen 2, finetune 1 saved
    ({"ema": 0.9, "label_smoothing": 0.1, "mixup": 0.4}, 3),
    ({"soup_lrs": (6e-4,)}, 5),  # ... finetune 2, finetune2 1 saved: inside the second run
], ids=["plain", "ema-smoothing-mixup", "soup"])
def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch, extra, crash_at):
    from safetensors.numpy import load_file

    full = train(TEST_DATA, tmp_path / "full", _cfg(**extra), finalize=False)
    # interrupt the second run during fine-tuning
    import bonefrac.training.trainer as trainer

    real = trainer._save_checkpoint
    calls = {"n": 0}

    def crash(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(TEST_DATA, tmp_path / "resumed", _cfg(**extra), finalize=False)
    monkeypatch.setattr(trainer, "_save_checkpoint", real)
    with pytest.raises(FileExistsError):  # a checkpointed run is not silently overwritten
        (tmp_path / "resumed" / "model.json").write_text("{}")
        train(TEST_DATA, tmp_path / "resumed", _cfg(**extra), finalize=False)
    (tmp_path / "resumed" / "model.json").unlink()
    train(TEST_DATA, tmp_path / "resumed", _cfg(**extra), resume=True, finalize=False)
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


def test_weight_ema_averages_parameters_and_buffers_and_swaps_back():
    import torch
    from torch import nn

    from bonefrac.training.trainer import WeightEma

    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEma(net, decay=0.75)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update()  # the first update copies
    with torch.no_grad():
        net[0].weight.add_(4.0)
        net[1].running_mean.add_(8.0)
    ema.update()
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped():
        torch.testing.assert_close(net[0].weight, before["0.weight"] + 0.25 * 4.0)
        torch.testing.assert_close(net[1].running_mean, before["1.running_mean"] + 0.25 * 8.0)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, own[k])  # the trained weights are back


def test_ema_run_validates_the_average_and_logs_the_raw_weights(tmp_path):
    # Decay 1: the average never moves from its first copy (the weights after a stage's first
    # step), so every fine-tuning epoch must validate exactly those, while training goes on.
    run = train(TEST_DATA, tmp_path / "run", _cfg(ema=1.0, epochs_finetune=3), finalize=False)
    hist = json.loads((run / "history.json").read_text())
    assert all("val_auc_raw" in h for h in hist)
    fine = [h for h in hist if h["stage"] == "finetune"]
    assert len(fine) == 3 and len({h["val_loss"] for h in fine}) == 1
    assert len({h["loss"] for h in fine}) == 3  # the trained weights did move


def test_soup_averages_runs_that_each_start_from_stage_1(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import bonefrac.training.trainer as trainer

    real, seen = trainer.average_weights, []
    monkeypatch.setattr(trainer, "average_weights", lambda states: real(seen.append(states)
                                                                        or states))
    cfg = _cfg(soup_lrs=(TrainConfig.lr_finetune, 6e-4))
    run = train(TEST_DATA, tmp_path / "run", cfg, finalize=False)
    hist = json.loads((run / "history.json").read_text())
    rows = {st: [h["loss"] for h in hist if h["stage"] == st]
            for st in ("finetune", "finetune2", "finetune3")}
    # Same rate, same start (stage 1's best), same seeds: the second run repeats the first.
    assert rows["finetune2"] == rows["finetune"] != rows["finetune3"]
    (states,) = seen
    ck = run / "checkpoints"
    stage1 = load_file(str(ck / "best_frozen.safetensors"))
    for st, got in zip(rows, states, strict=True):
        f = ck / f"best_{st}.safetensors"  # absent: the run never beat stage 1
        want = load_file(str(f)) if f.exists() else stage1
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, msg=f"{st} {k}")
    soup = load_file(str(run / "model.safetensors"))
    for k, v in real(states).items():
        torch.testing.assert_close(soup[k], v, msg=k)


def test_average_weights_means_floats_and_keeps_integer_buffers():
    import torch

    from bonefrac.training.trainer import average_weights

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    out = average_weights([a, b])
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))
    assert out["n"].item() == 5


@pytest.mark.parametrize(("bad", "says"), [
    ({"ema": 1.5}, "ema"), ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"mixup": -1.0}, "mixup"), ({"soup_lrs": (0.0,)}, "learning rates")])
def test_config_refuses_nonsense_options(bad, says):
    with pytest.raises(ValueError, match=says):
        TrainConfig(**bad)


def test_box_supervised_run_trains_a_fracture_map_that_export_and_prediction_use(
        tmp_path, tiny_runs):
    """Warm start from a trained run, boxes from a file: the fracture-map loss falls, the run
    is one member whose heat map is the trained map (in [0, 1]) through ONNX prediction."""
    from bonefrac.export.onnx import export_model
    from bonefrac.inference import Ensemble

    cfg = _cfg(epochs_frozen=0, epochs_finetune=4, views=1, boxes=str(
        TEST_DATA / "fracture_boxes.csv"), init_from=str(tiny_runs["mobilenetv2"]),
        lr_finetune=3e-3)
    run = train(TEST_DATA, tmp_path / "loc", cfg)
    mj = json.loads((run / "model.json").read_text())
    assert mj["loc_head"] is True and mj["heatmap"] == "fracture_map"
    hist = json.loads((run / "history.json").read_text())
    assert [h["stage"] for h in hist] == ["finetune"] * 4
    assert hist[-1]["loc_loss"] < hist[0]["loc_loss"]  # the same view every epoch: it learns
    ens = Ensemble.load(export_model(run, tmp_path / "exported"), backend="onnx")
    gray = np.stack([np.asarray(Image.open(p).convert("L").resize((TINY_SIZE, TINY_SIZE)))
                     for p in sorted(TEST_DATA.rglob("*.jpg"))[:4]])
    pred = ens.predict_gray(gray, explain=True)
    assert pred.cam.shape == (4, 3, 3) and pred.cam.min() >= 0 and pred.cam.max() <= 1
    assert pred.loc.score == pytest.approx(pred.cam.reshape(4, -1).max(1), abs=0.05)


def test_box_supervision_is_off_without_boxes_or_with_weight_zero(tmp_path):
    run = train(TEST_DATA, tmp_path / "plain", _cfg(epochs_frozen=1, epochs_finetune=1,
                                                    loc_weight=0.0,
                                                    boxes=str(TEST_DATA / "fracture_boxes.csv")),
                finalize=False)
    mj = json.loads((run / "model.json").read_text())
    assert mj["loc_head"] is False and mj["heatmap"] == "gradcam"
    assert "loc_loss" not in json.loads((run / "history.json").read_text())[-1]


# Every option `bonefrac train` had before its options were derived from TrainConfig's fields.
TRAIN_FLAGS = {"--data", "--out", "--arch", "--weights", "--epochs-frozen", "--epochs-finetune",
               "--unfreeze-blocks", "--views", "--batch-size", "--lr-frozen", "--lr-finetune",
               "--soup-lrs", "--patience", "--hidden", "--dropout", "--seed", "--max-images",
               "--size", "--loc-weight", "--boxes", "--init-from", "--resume", "--bn",
               "--stop-on", "--schedule", "--label-smoothing", "--ema", "--mixup", "--device",
               "--threshold-policy"}


def _train_parser():
    import argparse

    from bonefrac.cli.common import HelpFormatter
    from bonefrac.cli.train import add_arguments

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def test_every_config_field_is_a_train_option_and_the_defaults_parse_to_train_config():
    import dataclasses

    from bonefrac.cli.train import config_values

    p = _train_parser()
    by_dest = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in by_dest, f"TrainConfig.{f.name} has no option"
        assert by_dest[f.name].help and f.metadata["help"] == by_dest[f.name].help, f.name
    flags = {s for a in p._actions for s in a.option_strings}
    assert not TRAIN_FLAGS - flags, TRAIN_FLAGS - flags  # none renamed or dropped
    assert TrainConfig(**config_values(p.parse_args(["--data", "D", "--out", "O"]))) \
        == TrainConfig()
    assert by_dest["train_bn"].option_strings == ["--bn"] and by_dest["train_bn"].default == "train"
    assert by_dest["monitor"].option_strings == ["--stop-on"]
    text = " ".join(p.format_help().split())
    assert "statistics (frozen) (default: train)" in text  # --bn's default as the CLI spells it
    assert "(default: None)" not in text and "(default: [])" in text  # --soup-lrs


def test_train_options_convert_to_config_values():
    from bonefrac.cli.train import config_values

    args = _train_parser().parse_args([
        "--data", "D", "--out", "O", "--bn", "frozen", "--weights", "None", "--stop-on",
        "val_loss", "--soup-lrs", "1e-4", "2e-4", "--max-images", "8", "--loc-pos-weight", "2",
        "--threshold-policy", "youden"])
    cfg = TrainConfig(**config_values(args))
    assert cfg == TrainConfig(train_bn=False, weights=None, monitor="val_loss",
                              soup_lrs=(1e-4, 2e-4), max_images=8, loc_pos_weight=2.0,
                              threshold_policy="youden")
    assert TrainConfig(**config_values(_train_parser().parse_args(
        ["--data", "D", "--out", "O", "--soup-lrs"]))).soup_lrs == ()
    with pytest.raises(SystemExit):
        _train_parser().parse_args(["--data", "D", "--out", "O", "--bn", "eval"])


def test_stage_steps_train_validate_checkpoint_and_resume_a_toy_model(tmp_path):
    """The stage object alone, on a linear model: each epoch a history row and a checkpoint;
    resuming a finished stage restores its best weights and history without training."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    from bonefrac.training.distributed import Dist
    from bonefrac.training.trainer import RunSetup, Stage, StageSpec

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype(np.float32), np.tile([0, 1], 16)
    vx, vy = rng.normal(size=(12, 4)).astype(np.float32), np.tile([0, 1], 6)
    (tmp_path / "checkpoints").mkdir()

    def stage(resume):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        rs = RunSetup(TrainConfig(batch_size=8), model, tmp_path, Dist(), torch.ones(2), resume)
        spec = StageSpec("frozen", model, model, lambda e: (x, y), (vx, vy), epochs=3, lr=1e-2)
        return model, Stage(spec, rs, [])

    model, first = stage(resume=False)
    hist = first.run()
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "lr"} <= set(hist[0])
    assert json.loads((tmp_path / "history.json").read_text()) == hist
    best = load_file(str(tmp_path / "checkpoints" / "best_frozen.safetensors"))
    model2, again = stage(resume=True)
    assert again.run() == hist
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, best[k])
        torch.testing.assert_close(v, model.state_dict()[k])


@pytest.mark.slow
def test_box_supervised_run_after_stage_1_writes_a_history_csv(tmp_path):
    """Stage 1 logs no fracture-map loss and stage 2 does: history.csv has every column."""
    run = train(TEST_DATA, tmp_path / "loc", _cfg(epochs_frozen=1, epochs_finetune=1, views=1,
                                                  boxes=str(TEST_DATA / "fracture_boxes.csv")),
                finalize=False)
    rows = list(csv.DictReader((run / "history.csv").read_text().splitlines()))
    assert [r["stage"] for r in rows] == ["frozen", "finetune"]
    assert rows[0]["loc_loss"] == "" and float(rows[1]["loc_loss"]) > 0


@pytest.mark.slow
def test_letterbox_run_without_a_test_split_trains_fits_and_predicts(tmp_path, tiny_runs):
    """A real box-supervised letterbox run on a data set that has no test split: it finishes
    (threshold fitted on validation, no test Results/), records its resizing, and predicts a
    file through ONNX with the letterbox decode."""
    import csv
    import shutil

    from bonefrac.export.onnx import export_model
    from bonefrac.inference import Ensemble
    from bonefrac.inference.predict import predict_batch

    data = tmp_path / "data"
    shutil.copytree(TEST_DATA, data)
    with open(TEST_DATA / "manifest.csv", newline="") as f:
        every = list(csv.DictReader(f))
    rows = [r for r in every if r["split"] != "test"]
    for r in every:
        if r["split"] == "test":
            (data / r["path"]).unlink()
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = _cfg(epochs_frozen=0, epochs_finetune=1, views=1, resize="letterbox",
               boxes=str(TEST_DATA / "fracture_boxes.csv"),
               init_from=str(tiny_runs["mobilenetv2"]))
    run = train(data, tmp_path / "lb", cfg)
    mj = json.loads((run / "model.json").read_text())
    assert mj["preprocessing"]["resize"] == "letterbox" and "threshold" in mj
    assert not (run / "Results").exists() or not any((run / "Results").rglob("test*"))
    ens = Ensemble.load(export_model(run, tmp_path / "exported"), backend="onnx")
    assert ens.resize == "letterbox"
    rows, errors = predict_batch(ens, [next(iter(sorted(data.rglob("*.jpg"))))])
    assert not errors and 0 <= rows[0]["peak_y"] <= 1


def test_one_cycle_schedule_runs_for_any_number_of_steps():
    """torch's OneCycleLR divided by zero at exactly 10 steps with a 10% warm-up."""
    import torch

    from bonefrac.training.trainer import warmup_share

    for total in range(1, 41):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=total,
                                                    pct_start=warmup_share(total))
        for _ in range(total):
            opt.step()
            sched.step()
    assert warmup_share(342) == 0.1  # the shipped recipes' schedules are unchanged
