"""Model v3's detector: numpy decoding and NMS against torchvision, detection metrics against
pycocotools, ONNX against torch, and a tiny real training run that learns a bright rectangle."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_iou, nms

from bonefrac.evaluation.detection import (
    ap_from,
    average_precision,
    coco_ap,
    froc,
    image_matches,
    pooled,
)
from bonefrac.inference.detect import DecodeConfig, decode, location_centres, raw_boxes
from bonefrac.inference.detect import box_iou as np_box_iou
from bonefrac.inference.detect import nms as np_nms
from bonefrac.inference.detections import detection_rows, shown_detections


def _random_boxes(rng, n, side=100.0):
    xy = rng.uniform(0, side * 0.8, (n, 2))
    wh = rng.uniform(side * 0.02, side * 0.3, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_box_iou_and_nms_match_torchvision():
    rng = np.random.default_rng(0)
    for trial in range(20):
        b = _random_boxes(rng, 60)
        s = rng.uniform(0, 1, 60).astype(np.float32)
        assert np.allclose(np_box_iou(b, b[:7]), box_iou(torch.from_numpy(b),
                                                         torch.from_numpy(b[:7])).numpy(),
                           atol=1e-6)
        for thr in (0.3, 0.5, 0.7):
            want = nms(torch.from_numpy(b), torch.from_numpy(s), thr).numpy()
            assert np_nms(b, s, thr).tolist() == want.tolist(), (trial, thr)


def test_decode_equals_a_torchvision_reference():
    """decode() = scores sqrt(sigmoid(cls) sigmoid(ctr)), boxes from the location centres, then
    torchvision's batched_nms on the candidates above score_min (top pre_nms)."""
    rng = np.random.default_rng(1)
    cfg = DecodeConfig(size=64, score_min=0.3, pre_nms=50, nms_iou=0.5, max_detections=10)
    pts = location_centres(64, cfg.strides)
    raw = np.concatenate([rng.normal(0, 2, (3, len(pts), 2)),
                          rng.uniform(1, 20, (3, len(pts), 4))], -1).astype(np.float32)
    got = decode(raw, cfg)
    t = torch.from_numpy(raw)
    for i in range(3):
        score = torch.sqrt(torch.sigmoid(t[i, :, 0]) * torch.sigmoid(t[i, :, 1]))
        p = torch.from_numpy(pts)
        boxes = torch.stack([p[:, 0] - t[i, :, 2], p[:, 1] - t[i, :, 3],
                             p[:, 0] + t[i, :, 4], p[:, 1] + t[i, :, 5]], 1).clamp(0, 64)
        cand = torch.nonzero(score >= cfg.score_min)[:, 0]
        cand = cand[torch.argsort(score[cand], descending=True, stable=True)[:cfg.pre_nms]]
        keep = batched_nms(boxes[cand], score[cand], torch.zeros(len(cand)), cfg.nms_iou)
        keep = cand[keep[:cfg.max_detections]]
        assert np.allclose(got[i][0], (boxes[keep] / 64).numpy(), atol=1e-6)
        assert np.allclose(got[i][1], score[keep].numpy(), atol=1e-6)
    assert raw_boxes(raw, 64, cfg.strides)[0].shape == (3, len(pts), 4)
    with pytest.raises(ValueError, match="locations"):
        raw_boxes(raw, 96, cfg.strides)


def _fixture(seed=2, n=40):
    """Random ground truth and noisy detections (some right, some wrong, some normals)."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(n):
        g = _random_boxes(rng, int(rng.integers(0, 3)), 1.0)
        j = g + rng.normal(0, 0.03, g.shape).astype(np.float32)
        jitter = np.concatenate([np.minimum(j[:, :2], j[:, 2:]), np.maximum(j[:, :2], j[:, 2:])],
                                1)
        wrong = _random_boxes(rng, int(rng.integers(0, 3)), 1.0)
        b = np.concatenate([jitter, wrong]) if len(g) or len(wrong) else np.zeros((0, 4))
        gts.append(g)
        dets.append((b, rng.uniform(0, 1, len(b))))
    return dets, gts


def test_ap_equals_pycocotools_on_a_fixture():
    """The one matching kernel, integrated COCO's way (101 recall points), gives pycocotools'
    AP@0.5 and AP@0.75; the VOC all-point AP is within a point of it."""
    dets, gts = _fixture()
    coco = coco_ap(dets, gts)
    for iou, key in ((0.5, "ap50"), (0.75, "ap75")):
        _, tp, n_gt = pooled(image_matches(dets, gts, iou))
        assert ap_from(tp, n_gt, points=101) == pytest.approx(coco[key], abs=1e-6)
    assert abs(average_precision(dets, gts) - coco["ap50"]) < 0.02
    assert 0 < coco["ap"] < coco["ap50"]


def test_ap_and_froc_by_hand():
    gt = [np.array([[0, 0, 1, 1]], np.float32), np.array([[0, 0, 1, 1]], np.float32),
          np.zeros((0, 4), np.float32)]
    box = np.array([[0, 0, 1, 1]], np.float32)
    miss = np.array([[2, 2, 3, 3]], np.float32)
    # ranked: hit (0.9), false (0.8, on the normal image), hit (0.7)
    dets = [(box, np.array([0.9])), (box, np.array([0.7])), (miss, np.array([0.8]))]
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1, 2/3, 2/3 -> AP 1/2 + 2/3 / 2
    assert average_precision(dets, gt) == pytest.approx(0.5 + (2 / 3) / 2)
    assert froc(dets, gt, rates=(0.25, 0.5)) == {0.25: 0.5, 0.5: 1.0}  # 1 FP / 3 images
    assert average_precision([(box, np.array([0.5]))] * 2 + [(miss, np.array([0.1]))], gt) == 1


def test_shown_detections_follow_the_decision_and_the_box_threshold():
    dets = [{"rank": 1, "score": 0.8, "x0": 0, "y0": 0, "x1": 1, "y1": 1},
            {"rank": 2, "score": 0.2, "x0": 0, "y0": 0, "x1": 1, "y1": 1}]
    row = {"file": "a.png", "decision": "fractured", "detections": dets}
    assert shown_detections(row, 0.5) == dets[:1]
    assert shown_detections({**row, "decision": "non_fractured"}, 0.0) == []
    assert shown_detections({**row, "decision": "uncertain"}, 0.0) == []
    assert [r["rank"] for r in detection_rows([row, {"file": "b", "detections": []}])] == [1, 2]


# ------------------------------------------------------------------ real models, real training
@pytest.fixture(scope="module")
def det_model():
    from bonefrac.models import create_model

    torch.manual_seed(0)
    m = create_model("mobilenetv2", weights=None, loc_head=True, det_head=True).eval()
    with torch.no_grad():  # random-init heads give near-constant outputs: make them vary
        for p in m.det.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_onnx_boxes_match_torch(det_model, tmp_path):
    from bonefrac.export.onnx import export_member
    from bonefrac.inference.runners import OnnxRunner
    from bonefrac.models.torch_runner import TorchRunner

    det_model.preprocessing = type(det_model.preprocessing)(
        size=128, mean=det_model.preprocessing.mean, std=det_model.preprocessing.std,
        resize="letterbox")
    export_member(det_model, tmp_path / "m.onnx")
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 128, 128)).astype(np.float32)
    a = OnnxRunner(tmp_path / "m.onnx").run_det(x)
    b = TorchRunner(det_model).run_det(x)
    assert set(a) == set(b) == {"logits", "cam", "pooled", "det"}
    cfg = DecodeConfig(128, score_min=0.0)
    for (ba, sa), (bb, sb) in zip(decode(a["det"], cfg), decode(b["det"], cfg), strict=True):
        assert len(ba) == len(bb) > 0
        assert np.abs(ba - bb).max() < 1e-4 and np.abs(sa - sb).max() < 1e-4


def _rectangles(root, n=48, size=96, seed=0):
    """A data set of noise images, half with a bright rectangle (the "fracture") and its box,
    split 2:1:1 by manifest.csv."""
    rng = np.random.default_rng(seed)
    rows, manifest = [], []
    for label in ("fractured", "non_fractured"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            split = ("train", "train", "val", "test")[i % 4]
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            rel = f"{label}/{label[0]}{i:03d}.png"  # names unique across classes
            if label == "fractured":
                w, h = rng.integers(14, 30, 2)
                x0, y0 = rng.integers(4, size - 34, 2)
                img[y0:y0 + h, x0:x0 + w] = 230
                rows.append([rel, x0 / size, y0 / size, (x0 + w) / size, (y0 + h) / size])
            Image.fromarray(img).save(root / rel)
            manifest.append([rel, label, split])
    with open(root / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "x0", "y0", "x1", "y1"], *rows])
    # noise images look alike to the near-duplicate grouping: each is its own group
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *manifest])
    with open(root / "groups.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "group_id"], *[[m[0], m[0]] for m in manifest]])


@pytest.mark.slow
def test_tiny_training_run_learns_a_bright_rectangle(tmp_path, monkeypatch):
    from bonefrac.data.boxes import dataset_boxes
    from bonefrac.data.dataset import load_index
    from bonefrac.inference.ensemble import Ensemble
    from bonefrac.training.config import TrainConfig
    from bonefrac.training.trainer import train

    monkeypatch.setenv("BONEFRAC_CACHE", str(tmp_path / "cache"))
    _rectangles(tmp_path / "data")
    cfg = TrainConfig(size=96, resize="letterbox", epochs_frozen=0, epochs_finetune=16, views=4,
                      batch_size=8, lr_finetune=2e-3, loc_weight=1.0, det_weight=1.0,
                      monitor="val_ap50")
    run = train(tmp_path / "data", tmp_path / "run", cfg, finalize=False)
    ens = Ensemble.load(run, backend="torch", verify=False)
    index = load_index(tmp_path / "data")
    boxes = dataset_boxes(tmp_path / "data")
    test = index.split("test")
    gray = np.stack([np.asarray(Image.open(s.path).convert("L")) for s in test])
    pred = ens.predict_gray(gray, explain=True, aspect=np.ones(len(test)))
    gts = [boxes.get(s.rel, np.zeros((0, 4), np.float32)) for s in test]
    assert average_precision(pred.detections, gts) >= 0.9
    # the same from bonefrac evaluate (metrics.json, report's gallery) ...
    from bonefrac.evaluation.evaluate import evaluate_model

    m = evaluate_model(run, index, split="test", out=tmp_path / "res", backend="torch")
    assert m["detection"]["ap50"]["value"] == pytest.approx(
        average_precision(pred.detections, gts), abs=1e-6)
    assert m["detection"]["source"] == "detection head" and m["detection"]["n_images"] == 24
    # ... and from the CLI's detections.csv (fractions of the original image, rank 1 = best)
    from bonefrac.cli.main import main

    assert main(["predict", str(tmp_path / "data" / "fractured"), "--model", str(run),
                 "--out", str(tmp_path / "p")]) == 0
    with open(tmp_path / "p" / "detections.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "rank", "score", "x0", "y0", "x1", "y1"]
    first = [r for r in rows if r["rank"] == "1"]
    assert len(first) == 48 and all(0 <= float(r["x0"]) < float(r["x1"]) <= 1 for r in first)
