"""Data indexing: canonical split, group integrity, near-duplicate grouping, corrupt files."""

import shutil

import numpy as np
import pytest
from helpers import SHARED_DATA, TEST_DATA
from PIL import Image

from bonefrac.data.dataset import (
    check_no_group_straddles,
    decode_all,
    load_index,
    near_duplicate_groups,
)
from bonefrac.data.io import ImageReadError, load_gray
from bonefrac.training.trainer import class_weights


def test_manifest_split_is_honoured():
    idx = load_index(TEST_DATA)
    assert idx.source == "manifest.csv"
    assert [len(idx.split(s)) for s in ("train", "val", "test")] == [16, 6, 6]
    assert "fractured=8" in idx.summary()


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data set not present")
def test_shared_canonical_split_has_no_straddling_group():
    idx = load_index(SHARED_DATA)
    assert [len(idx.split(s)) for s in ("train", "val", "test")] == [3631, 348, 169]
    check_no_group_straddles(idx.samples)  # raises if a group is in two splits
    assert len({s.group for s in idx.samples}) == 1852


def test_straddling_group_is_refused(tmp_path):
    root = tmp_path / "d"
    shutil.copytree(TEST_DATA, root)
    rows = (root / "manifest.csv").read_text().splitlines()
    a, b = rows[1].split(",")[0], rows[-1].split(",")[0]
    (root / "groups.csv").write_text(f"path,group_id\n{a},g1\n{b},g1\n")
    with pytest.raises(ValueError, match="straddle"):
        load_index(root)


def _augmented_copy(src, dst, angle, zoom, quality, flip):
    im = Image.open(src).convert("L")
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT).rotate(90, expand=True)
    w, h = im.size
    im = im.rotate(angle, resample=Image.BILINEAR)
    cw, ch = int(w / zoom), int(h / zoom)
    im = im.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2)).resize((w, h))
    im.save(dst, quality=quality)


def test_split_without_manifest_keeps_near_duplicates_together(tmp_path):
    root = tmp_path / "d"
    for cls in ("fractured", "non_fractured"):
        (root / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((TEST_DATA / cls).glob("*.jpg"))[:10]):
            shutil.copy(src, root / cls / f"img{i}.jpg")
            # re-encoded copies: one flipped and turned by 90 degrees, one slightly rotated
            # and zoomed, as augmented exports contain them
            _augmented_copy(src, root / cls / f"img{i}_aug1.jpg", 0, 1.0, 70, True)
            _augmented_copy(src, root / cls / f"img{i}_aug2.jpg", -1.5, 1.03, 85, False)
    paths = sorted(root.rglob("*.jpg"))
    groups = dict(zip(paths, near_duplicate_groups(paths), strict=True))
    same = [groups[p] == groups[p.with_name(p.stem.split("_")[0] + ".jpg")]
            for p in paths if "_aug" in p.stem]
    assert np.mean(same) >= 0.9  # copies found
    assert len(set(groups.values())) >= 18  # distinct radiographs not merged wholesale
    idx = load_index(root, seed=1, val_frac=0.2, test_frac=0.2)
    assert "stratified group split" in idx.source
    check_no_group_straddles(idx.samples)
    for sp in ("train", "val", "test"):
        labels = {s.label for s in idx.split(sp)}
        assert labels == {0, 1}, f"{sp} lost a class"


def test_corrupt_files_are_skipped_with_reason(tmp_path):
    root = tmp_path / "d"
    shutil.copytree(TEST_DATA, root)
    (root / "fractured" / "empty.jpg").write_bytes(b"")
    (root / "fractured" / "text.jpg").write_text("not an image")
    good = next((root / "non_fractured").glob("*.jpg"))
    (root / "non_fractured" / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    (root / "manifest.csv").unlink()
    idx = load_index(root)
    imgs, kept, skipped, sizes = decode_all(idx.samples, 64, resize="stretch")
    reasons = {p.split("/")[-1]: r for p, r in skipped}
    assert set(reasons) == {"empty.jpg", "text.jpg", "truncated.jpg"}
    assert "empty" in reasons["empty.jpg"] and "not a recognised" in reasons["text.jpg"]
    assert len(kept) == len(imgs) == len(sizes) == 28
    assert sizes.tolist() == [list(Image.open(s.path).size) for s in kept]
    with pytest.raises(ImageReadError, match="text.jpg"):
        load_gray(root / "fractured" / "text.jpg", 224, "stretch")


def test_class_weights_inverse_frequency():
    y = np.array([0] * 30 + [1] * 10)
    w = class_weights(y)
    assert w == pytest.approx([40 / 60, 40 / 20])
    assert (w * np.bincount(y)).sum() == pytest.approx(len(y))  # total weight preserved
    with pytest.raises(ValueError):
        class_weights(np.zeros(5, dtype=int))
