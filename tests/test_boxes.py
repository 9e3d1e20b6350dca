"""Fracture boxes: parsing, per-cell targets, boxes moved by augmentation, peak/box read-out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_DATA
from torchvision.transforms import v2

from bonefrac.data.boxes import BoxFileError, cell_targets, read_boxes
from bonefrac.inference.localise import localise
from bonefrac.training.augment import (
    MIN_VISIBLE,
    augment_batch,
    augment_with_boxes,
    train_augmentation,
)


def test_read_boxes_groups_rows_ignores_extra_columns_and_names_bad_rows(tmp_path):
    boxes = read_boxes(TEST_DATA / "fracture_boxes.csv")
    assert len(boxes) == 14 and sum(len(b) for b in boxes.values()) == 16
    assert all(b.shape[1] == 4 and (b[:, 2] >= b[:, 0]).all() for b in boxes.values())
    f = tmp_path / "boxes.csv"
    f.write_text("path,x0,y0,x1,y1,note\na.jpg,0.1,0.2,0.3,0.4,x\na.jpg,0,0,1,1,y\n")
    assert np.allclose(read_boxes(f)["a.jpg"], [[0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]])
    f.write_text("path,x0,y0,x1,y1\na.jpg,0.5,0.2,0.3,0.4\n")
    with pytest.raises(BoxFileError, match=r"boxes.csv:2: need 0 <= x0 <= x1"):
        read_boxes(f)
    f.write_text("path,x0,y0,x1\na.jpg,0.5,0.2,0.3\n")
    with pytest.raises(BoxFileError, match="missing column"):
        read_boxes(f)


def test_cell_targets_mark_overlapped_cells_and_grow_thin_boxes():
    t = cell_targets([np.array([[0.0, 0.0, 0.5, 0.25]]),  # top-left 2x1 cells of a 4x4 grid
                      np.array([[0.6, 0.6, 0.6, 0.6]]),   # a zero-size box: still its one cell
                      np.zeros((0, 4))], (4, 4))
    assert t[0].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert t[1].sum() == 1 and t[1, 2, 2] == 1
    assert t[2].sum() == 0


def _square_image(box_px: tuple[int, int, int, int], size: int = 64) -> np.ndarray:
    img = np.zeros((size, size), np.uint8)
    x0, y0, x1, y1 = box_px
    img[y0:y1, x0:x1] = 255
    return img


def _bright_bbox(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("aug", [
    v2.RandomHorizontalFlip(p=1.0),
    v2.RandomAffine(degrees=(90, 90)),
    v2.RandomAffine(degrees=0, translate=(0.2, 0.2), scale=(1.1, 1.1)),
], ids=["hflip", "rotate90", "shift-zoom"])
def test_boxes_follow_the_image_through_a_known_transform(aug):
    img = _square_image((8, 16, 24, 40))  # a bright 16x24 rectangle = the "fracture"
    torch.manual_seed(0)
    out, boxes = augment_with_boxes(img[None], [np.array([[8, 16, 24, 40]]) / 64], aug)
    expected = _bright_bbox(out[0]) / 64
    assert boxes[0].shape == (1, 4)
    assert np.abs(boxes[0][0] - expected).max() <= 2 / 64  # within interpolation's 2 px


def test_no_augmented_copy_loses_its_box():
    """A box at the border under large shifts: draws that push it out are drawn again."""
    img = np.stack([_square_image((0, 0, 10, 10))] * 40)
    box = [np.array([[0, 0, 10, 10]]) / 64] * 40
    aug = v2.RandomAffine(degrees=0, translate=(0.45, 0.45))
    torch.manual_seed(3)
    out, moved = augment_with_boxes(img, box, aug)
    for o, b in zip(out, moved, strict=True):
        assert (b[:, 2] > b[:, 0]).all()  # still inside
        bright = (o > 127).sum()
        assert bright >= MIN_VISIBLE * 100 * 0.8  # the fracture's pixels are still visible


def test_images_without_boxes_are_augmented_exactly_as_before():
    gray = np.stack([_square_image((5, 5, 30, 50)), _square_image((20, 10, 40, 30))])
    torch.manual_seed(7)
    plain = augment_batch(gray, train_augmentation())
    torch.manual_seed(7)
    with_empty, _ = augment_with_boxes(gray, [np.zeros((0, 4))] * 2, train_augmentation())
    assert np.array_equal(plain, with_empty)


def test_peak_and_box_of_a_bright_spot_are_fractions_of_the_original_image():
    """A non-square image with a bright spot; the map is its 10x10 stretch (what a model's
    feature grid sees): peak and box come back as fractions of the original width/height."""
    h, w = 300, 500
    img = np.zeros((h, w), np.float32)
    img[60:90, 350:400] = 1.0  # spot centre at x = 375/500 = 0.75, y = 75/300 = 0.25
    from PIL import Image

    cam = np.asarray(Image.fromarray(img, mode="F").resize((10, 10), Image.BOX))
    loc = localise(cam[None])
    assert loc.peak[0] == pytest.approx([0.75, 0.25], abs=0.06)
    x0, y0, x1, y1 = loc.box[0]
    assert x0 <= 0.75 <= x1 and y0 <= 0.25 <= y1
    assert (x1 - x0) < 0.35 and (y1 - y0) < 0.35
    assert loc.score[0] == pytest.approx(cam.max(), rel=0.05)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_predicted_peak_and_box_are_fractions_of_the_original_non_square_file(tmp_path, resize):
    """End to end through a real ONNX member and ``bonefrac predict``'s batch path: the member's
    heat map is its input average-pooled to the feature grid, so on a 500x300 file with one
    bright spot the row's peak and box must land on the spot, in the original image's
    fractions (the stretch or the letterbox bars of the square input must be undone)."""
    import json

    from PIL import Image

    from bonefrac.inference import Ensemble
    from bonefrac.inference.predict import predict_batch
    from bonefrac.utils import sha256_file

    class SpotMap(torch.nn.Module):
        def forward(self, x):
            cam = torch.nn.functional.avg_pool2d(x[:, :1], 16)[:, 0]  # (N, 14, 14) at 224 px
            return x[:, 0, 0, :2] * 0, cam  # logits (N, 2): unused here, dynamic batch

    torch.onnx.export(SpotMap(), (torch.zeros(1, 3, 224, 224),), str(tmp_path / "m.onnx"),
                      input_names=["input"], output_names=["logits", "cam"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "cam": {0: "n"}},
                      opset_version=17, dynamo=False)
    pre = {"size": 224, "mean": [0, 0, 0], "std": [1, 1, 1], "resize": resize}
    (tmp_path / "ensemble_meta.json").write_text(json.dumps({
        "format": "bonefrac-ensemble/1", "model_id": "spot", "threshold": 0.5,
        "members": [{"name": "spot", "arch": "spot", "onnx": "m.onnx",
                     "onnx_sha256": sha256_file(tmp_path / "m.onnx"), "preprocessing": pre,
                     "heatmap": "fracture_map", "fusion_weight": 1.0}]}))
    img = np.full((300, 500), 20, np.uint8)
    img[60:90, 350:400] = 255  # centre (0.75, 0.25) of the 500x300 image
    Image.fromarray(img).save(tmp_path / "spot.png")
    rows, errors = predict_batch(Ensemble.load(tmp_path), [tmp_path / "spot.png"])
    assert not errors
    r = rows[0]
    assert (r["peak_x"], r["peak_y"]) == pytest.approx((0.75, 0.25), abs=1 / 14)
    assert r["box_x0"] <= 0.75 <= r["box_x1"] and r["box_y0"] <= 0.25 <= r["box_y1"]
    assert r["box_x1"] - r["box_x0"] < 0.4 and r["box_y1"] - r["box_y0"] < 0.4


def test_letterbox_keeps_the_aspect_and_maps_boxes_into_the_square(tmp_path):
    """A 400x200 file letterboxed to 64 px: the image fills rows 16..48 (black bars above and
    below), and a box given as fractions of the image lands on the same pixels of the square."""
    from PIL import Image

    from bonefrac.data.io import load_gray
    from bonefrac.data.preprocess import boxes_to_letterbox, letterbox_rect

    img = np.full((200, 400), 200, np.uint8)
    img[100:150, 300:400] = 255  # box (0.75, 0.5, 1.0, 0.75) of the image
    Image.fromarray(img).save(tmp_path / "wide.png")
    assert letterbox_rect(400, 200) == (0.0, 0.25, 1.0, 0.75)
    sq = load_gray(tmp_path / "wide.png", 64, "letterbox")
    assert sq.shape == (64, 64)
    assert (sq[:16] == 0).all() and (sq[48:] == 0).all() and (sq[17:47] >= 199).all()
    box = boxes_to_letterbox(np.array([[0.75, 0.5, 1.0, 0.75]]), 400, 200)[0]
    assert box == pytest.approx([0.75, 0.5, 1.0, 0.625])
    x0, y0, x1, y1 = (round(v * 64) for v in box)
    assert (sq[y0 + 1:y1 - 1, x0 + 1:x1] == 255).all()  # the box's pixels are the bright ones
    tall = load_gray(tmp_path / "wide.png", 64, "stretch")  # stretch: the whole square is the image
    assert (tall > 0).all()


def test_from_letterbox_crops_the_bars_of_a_heat_map():
    """A map over a letterboxed 2:1 image whose only hot cell is at the image's centre-right
    comes back over the image alone, hot at the same place of the image."""
    from bonefrac.inference.localise import from_letterbox

    cam = np.zeros((1, 16, 16), np.float32)
    cam[0, 7:9, 12:14] = 1.0  # square (0.81, 0.5): the image's (0.81, 0.5) as well
    cam[0, :4] = 0.5  # the bar above the image: must be cropped away
    out = from_letterbox(cam, np.array([2.0]))
    assert out.shape == (1, 16, 16)
    loc = localise(out)
    assert loc.peak[0] == pytest.approx([0.81, 0.5], abs=0.05)
    assert out[0, 0].max() < 0.6  # the bar's 0.5 is gone from the top row


def test_training_boxes_move_into_the_letterbox_frame(tmp_path):
    """The trainer's per-image targets for a letterbox run: a fractured 400x200 image's box
    (fractions of the image) lands on the image's part of the square; stretch keeps it. The
    sizes are the ones the decode pool reports (a portrait EXIF turn makes it 400x200)."""
    from PIL import Image

    from bonefrac.data.dataset import Sample, decode_all
    from bonefrac.training.trainer import _image_boxes

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: the stored 200x400 shows as 400x200
    Image.fromarray(np.zeros((400, 200), np.uint8)).save(tmp_path / "f.jpg", exif=exif)
    samples = [Sample(tmp_path / "f.jpg", "f.png", 1), Sample(tmp_path / "f.jpg", "n.png", 0)]
    decoded = decode_all(samples, 64, resize="letterbox")
    assert decoded.sizes.tolist() == [[400, 200]] * 2
    assert decoded.aspects.tolist() == [2.0, 2.0]
    boxes = {"f.png": np.array([[0.0, 0.0, 0.5, 1.0]], np.float32)}
    per, mask = _image_boxes(decoded.kept, boxes, "letterbox", decoded.sizes)
    assert per[0] == pytest.approx(np.array([[0.0, 0.25, 0.5, 0.75]]))
    assert len(per[1]) == 0 and mask.tolist() == [1.0, 1.0]
    per, _ = _image_boxes(samples, boxes, "stretch")
    assert per[0] == pytest.approx(boxes["f.png"])
