"""Index a labelled folder (``fractured/`` + ``non_fractured/``) into leakage-safe splits.

``manifest.csv`` (path,label,split or orig_split) and ``groups.csv`` (path,group_id,...) beside the
class folders are honoured. Without a manifest, a stratified split is built in which near-duplicate
images (perceptual-hash neighbours: rotated / zoomed / re-encoded copies) stay together.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bonefrac import CLASSES, InputError
from bonefrac.data.io import IMAGE_SUFFIXES, ImageReadError
from bonefrac.data.isolation import decode_file

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test"}


@dataclass
class Sample:
    path: Path
    rel: str  # path relative to the data root, the sample's stable id
    label: int  # index into CLASSES; 1 = fractured
    split: str = ""
    group: str = ""
    attrs: dict[str, str] = field(default_factory=dict)  # extra manifest/groups columns


@dataclass
class DatasetIndex:
    root: Path
    samples: list[Sample]
    source: str  # how the split was obtained
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def summary(self) -> str:
        lines = [f"data: {self.root}  ({len(self.samples)} images; split from {self.source})"]
        for sp in SPLITS:
            c = Counter(s.label for s in self.split(sp))
            n_groups = len({s.group for s in self.split(sp)})
            lines.append(f"  {sp:5s}: {sum(c.values()):5d} images in {n_groups:5d} groups  "
                         f"{CLASSES[1]}={c[1]}  {CLASSES[0]}={c[0]}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"    {f}: {r}" for f, r in self.skipped]
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """sha256 over (path, label, split): names exactly which data a model was fitted on."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: s.rel):
            h.update(f"{s.rel}\t{s.label}\t{s.split}\n".encode())
        return h.hexdigest()


def scan_folder(root: str | os.PathLike) -> list[Sample]:
    """All image files under ``root/<class>/`` (recursively), labelled by class folder.

    Hidden files and folders are skipped, as prediction skips them (e.g. macOS ``._x.jpg``).
    """
    root = Path(root)
    missing = [c for c in CLASSES if not (root / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root}: expected class folders {CLASSES}; missing {missing}")
    out = []
    for label, cls in enumerate(CLASSES):
        for p in sorted((root / cls).rglob("*")):
            hidden = any(part.startswith(".") for part in p.relative_to(root / cls).parts)
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not hidden:
                out.append(Sample(p, p.relative_to(root).as_posix(), label))
    return out


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def load_index(root: str | os.PathLike, *, seed: int = 0, val_frac: float = 0.1,
               test_frac: float = 0.1, all_test: bool = False, regroup: bool = False
               ) -> DatasetIndex:
    """Index ``root`` and assign every sample a split and a group.

    Args:
        all_test: external validation: every image goes to ``test`` (no split is made).
        regroup: a near-duplicate group that straddles the manifest's splits is moved whole
            into the split holding most of its images (ties: train) instead of refused.
    """
    root = Path(root)
    samples = scan_folder(root)
    groups = _read_csv(root / "groups.csv") if (root / "groups.csv").exists() else {}
    manifest = _read_csv(root / "manifest.csv") if (root / "manifest.csv").exists() else {}
    for s in samples:
        row = {**manifest.get(s.rel, {}), **groups.get(s.rel, {})}
        s.group = row.get("group_id") or ""
        s.attrs = {k: v for k, v in row.items() if k not in ("path", "label", "sha256")}
        if manifest and s.rel in manifest:
            m = manifest[s.rel]
            if m.get("label") and m["label"] != CLASSES[s.label]:
                raise InputError(f"{root / 'manifest.csv'}: {s.rel} is labelled {m['label']} "
                                 f"but lies in {CLASSES[s.label]}/")
            s.split = _SPLIT_ALIASES.get((m.get("split") or m.get("orig_split") or "").lower(), "")

    if all_test:
        for s in samples:
            s.split = "test"
            s.group = s.group or s.rel
        return DatasetIndex(root, samples, "all images as test (external validation)")

    if not groups:
        for s, g in zip(samples, near_duplicate_groups([s.path for s in samples]), strict=True):
            s.group = g
    for s in samples:
        s.group = s.group or s.rel

    if manifest and all(s.split for s in samples):
        source = "manifest.csv"
        if regroup:
            moved = regroup_straddlers(samples)
            source += f" ({moved} near-duplicate group(s) moved whole into one split)"
        check_no_group_straddles(samples)
    else:
        stratified_group_split(samples, seed=seed, val_frac=val_frac, test_frac=test_frac)
        source = f"stratified group split (seed={seed}, val={val_frac}, test={test_frac})"
    return DatasetIndex(root, samples, source)


def check_no_group_straddles(samples: Sequence[Sample]) -> None:
    splits: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        splits[s.group].add(s.split)
    bad = {g: sorted(v) for g, v in splits.items() if len(v) > 1}
    if bad:
        g, v = next(iter(bad.items()))
        files = [f"{s.rel} ({s.split})" for s in samples if s.group in bad]
        raise InputError(f"{len(bad)} near-duplicate group(s) straddle splits, e.g. {g} in {v}; "
                         f"{len(files)} file(s), first {min(5, len(files))}: "
                         f"{', '.join(files[:5])}. Fix the manifest, or rerun with --regroup "
                         "(bonefrac adapt) to move each group whole into one split")


def regroup_straddlers(samples: Sequence[Sample]) -> int:
    """Move each group found in several splits into the one holding most of its images (ties:
    the first of train, val, test); returns how many groups moved."""
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[s.group].append(s)
    moved = 0
    for members in by_group.values():
        counts = Counter(s.split for s in members)
        if len(counts) > 1:
            best = max(SPLITS, key=lambda sp: (counts[sp], -SPLITS.index(sp)))
            for s in members:
                s.split = best
            moved += 1
    return moved


def stratified_group_split(samples: Sequence[Sample], *, seed: int, val_frac: float,
                           test_frac: float) -> None:
    """Assign whole groups to splits, per majority label, so each split keeps the class mix."""
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[s.group].append(s)
    rng = random.Random(seed)
    for label in range(len(CLASSES)):
        gs = sorted(g for g, m in by_group.items()
                    if Counter(x.label for x in m).most_common(1)[0][0] == label)
        rng.shuffle(gs)
        total = sum(len(by_group[g]) for g in gs)
        want = {"test": test_frac * total, "val": val_frac * total}
        got = Counter()
        for g in gs:
            sp = next((k for k in ("test", "val") if got[k] + len(by_group[g]) / 2 < want[k]),
                      "train")
            got[sp] += len(by_group[g])
            for s in by_group[g]:
                s.split = sp


def phash(gray: np.ndarray) -> np.uint64:
    """64-bit DCT perceptual hash of a grayscale image."""
    from PIL import Image

    small = np.asarray(Image.fromarray(gray).resize((32, 32), Image.BILINEAR), dtype=np.float64)
    n = np.arange(32)
    dct = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64)  # DCT-II basis, rows = freq
    coef = (dct @ small @ dct.T)[:8, :8].ravel()
    return np.packbits(coef > np.median(coef[1:])).view(">u8")[0].astype(np.uint64)


def phash_variants(gray: np.ndarray) -> np.ndarray:
    """Hashes of the image flipped, turned by 90-degree steps and rotated +-10 degrees: ``(24,)``.

    Augmented copies in exported data sets are typically flipped/rotated; comparing one image's
    plain hash with the other's variants makes the match (mostly) invariant to that.
    """
    from PIL import Image

    im, out = Image.fromarray(gray), []
    for b in (im, im.transpose(Image.FLIP_LEFT_RIGHT)):
        for quarter in (0, 90, 180, 270):
            c = b.rotate(quarter)
            out += [phash(np.asarray(c.rotate(a, resample=Image.BILINEAR))) for a in (-10, 0, 10)]
    return np.array(out, dtype=np.uint64)


def near_duplicate_groups(paths: Sequence[Path], max_bits: int = 8) -> list[str]:
    """Group likely copies of one radiograph: union-find over pairs whose pHash distance, minimised
    over flips / 90-degree turns / +-10-degree rotations, is <= ``max_bits`` of 64.

    On the shared bone-fracture set's labelled copy groups this threshold finds about half of
    the true copy pairs directly (more through transitivity) with a false-pair rate near 3e-4;
    looser thresholds chain unrelated images into giant groups. Unreadable files get their own
    group. Returns one group id per path.
    """
    def hashes(p: Path) -> np.ndarray | None:
        try:
            # the hash's own square (a stretched thumbnail), whatever the model's input
            return phash_variants(decode_file(p, (64,), resize="stretch").inputs[64])
        except ImageReadError:
            return None

    with ThreadPoolExecutor() as ex:
        hs = list(ex.map(hashes, paths))
    ok = np.array([h is not None for h in hs])
    var = np.stack([h if h is not None else np.zeros(24, np.uint64) for h in hs])  # (N, 24)
    plain = var[:, 1]  # no flip, no quarter turn, angle 0
    parent = list(range(len(paths)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.nonzero(ok)[0]:
        d = np.bitwise_count(var[i + 1:] ^ plain[i]).min(axis=1)
        for j in np.nonzero((d <= max_bits) & ok[i + 1:])[0] + i + 1:
            parent[find(int(j))] = find(int(i))
    return [f"phash_{find(i):06d}" for i in range(len(paths))]


class DecodedSplit(NamedTuple):
    """What :func:`decode_all` returns.

    - ``images``: ``(N, size, size)`` uint8, the kept samples' model inputs;
    - ``kept``: the N samples that decoded, in input order;
    - ``skipped``: ``(file, reason)`` of each one that did not;
    - ``sizes``: ``(N, 2)`` int64, each kept image's ``(width, height)`` in pixels as displayed
      (EXIF rotation applied), which letterbox models need to map boxes and heat maps.
    """

    images: np.ndarray
    kept: list[Sample]
    skipped: list[tuple[str, str]]
    sizes: np.ndarray

    @property
    def aspects(self) -> np.ndarray:
        """``(N,)`` float64 width/height of each kept image."""
        return self.sizes[:, 0] / self.sizes[:, 1]


def decode_all(samples: Sequence[Sample], size: int, *, resize: str,
               desc: str = "decoding", cache_dir: str | os.PathLike | None = None
               ) -> DecodedSplit:
    """Decode samples to ``(N, size, size)`` uint8 (``resize``: stretch or letterbox),
    skipping unreadable files. Each file is decoded in the isolated decode pool
    (:mod:`bonefrac.data.isolation`): one that crashes or hangs its decoder is skipped too.

    With ``cache_dir`` the result is kept in a ``.npz`` keyed by paths, sizes and mtimes, so
    later runs skip decoding.
    """
    from tqdm.auto import tqdm

    key = hashlib.sha256((str(size) if resize == "stretch" else f"{size}-{resize}").encode())
    for s in samples:
        st = s.path.stat() if s.path.exists() else None
        key.update(f"{s.path}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) / f"decoded_{key.hexdigest()[:24]}.npz" if cache_dir else None
    if cache and cache.exists():
        z = np.load(cache, allow_pickle=False)
        if "sizes" in z:  # caches written before sizes were kept are decoded again
            kept_rel = set(z["kept"].tolist())
            return DecodedSplit(z["images"], [s for s in samples if s.rel in kept_rel],
                                [tuple(x) for x in z["skipped"].tolist()], z["sizes"])

    def one(s: Sample):
        try:
            d = decode_file(s.path, (size,), resize=resize)
            return d.inputs[size], (d.width, d.height), None
        except ImageReadError as e:
            return None, None, e.reason

    images, kept, skipped, sizes = [], [], [], []
    with ThreadPoolExecutor() as ex:
        for s, (img, wh, err) in zip(samples, tqdm(ex.map(one, samples), total=len(samples),
                                                    desc=desc, unit="img"), strict=True):
            if err is None:
                images.append(img)
                kept.append(s)
                sizes.append(wh)
            else:
                skipped.append((str(s.path), err))
    out = DecodedSplit(np.stack(images) if images else np.zeros((0, size, size), np.uint8),
                       kept, skipped, np.array(sizes, np.int64).reshape(-1, 2))
    if cache:
        from bonefrac.utils import atomic_write

        with atomic_write(cache, "wb") as f:
            np.savez(f, images=out.images, sizes=out.sizes,
                     kept=np.array([s.rel for s in kept] or [""])[:len(kept)],
                     skipped=np.array(skipped or [("", "")])[:len(skipped)].reshape(-1, 2))
    return out
