"""Pack for the v2 sweep on a lent GPU machine (``v2_gpu.sh``): train + validation, never test.

``build`` copies the train and validation images of a data set byte for byte (the test split is
left out and its absence asserted), with ``manifest.csv``, ``groups.csv`` and ``boxes.csv``
restricted to them, so that ``bonefrac train --data PACK/data`` works there; and the v1
ensemble's members as fp16 safetensors in ``PACK/init/`` for ``--init-from`` (fp32 would not
fit the device tool's 64 MiB; the fp16 copy is checked against fp32 on real images).
``size`` adds up what a ``run`` call would send: tracked files on disk, untracked files git does
not ignore, and the carried paths.

    python experiments/recipe_sweep/v2_pack.py build ../shared/data/bone-fracture .gpu/v2 --zip
    python experiments/recipe_sweep/v2_pack.py build ../shared/data/bone-fracture .gpu/v2smoke \
        --limit 24                                    # a small pack for the CPU smoke run
    python experiments/recipe_sweep/v2_pack.py size --carry .gpu/v2    # exit 1 when over 64 MiB

``--zip`` stores ``data/`` as one uncompressed ``data.zip`` (``v2_gpu.py`` unpacks it): ~300
bytes per file on top of the JPEGs (a tar adds ~2 KB for these long names), and one file, should
the tool count disk blocks (4,000 small files take ~8 MiB more on disk than their bytes).

Prints JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from bonefrac.data.dataset import load_index
from bonefrac.utils import sha256_file, write_json, write_text

SPLITS = ("train", "val")  # what the pack holds; "test" never
LIMIT_MIB = 64  # the device tool's limit on what travels (tree + carried paths)
V1 = "src/bonefrac/pretrained/ensemble_bone-fracture_v1"


def _filter_csv(src: Path, keep: set[str]) -> tuple[str, int]:
    """``src``'s text with only the rows whose ``path`` is in ``keep`` (header kept)."""
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["path"] in keep]
        fields = reader.fieldnames or []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue(), len(rows)


def _pick(index, limit: int | None) -> list:
    """The samples of ``SPLITS``; with ``limit``, the first ``limit // 2`` of each class per
    split (smoke packs keep both classes)."""
    out = []
    for sp in SPLITS:
        samples = index.split(sp)
        if limit:
            samples = [s for c in (0, 1) for s in [t for t in samples if t.label == c][:limit // 2]]
        out += samples
    return out


def copy_images(data: Path, dst: Path, limit: int | None) -> dict:
    """Copy the train/val images and their CSV rows into ``dst``; returns counts."""
    index = load_index(data)
    if index.source != "manifest.csv":
        raise SystemExit(f"{data}: no canonical split in manifest.csv (got {index.source})")
    picked = _pick(index, limit)
    assert all(s.split in SPLITS for s in picked), "a test image was picked"
    keep = {s.rel for s in picked}
    test = {s.rel for s in index.split("test")}
    assert not keep & test, "the pack must not hold the test split"
    for s in picked:
        (dst / s.rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s.path, dst / s.rel)  # byte for byte; mtime kept
    rows = {}
    for name in ("manifest.csv", "groups.csv", "boxes.csv"):
        if (data / name).exists():
            text, rows[name] = _filter_csv(data / name, keep)
            write_text(dst / name, text)
    return {"images": len(picked), "csv_rows": rows,
            "source_splits": {sp: len(index.split(sp)) for sp in ("train", "val", "test")}}


def check_pack(data: Path, dst: Path, limit: int | None) -> dict:
    """Re-index the pack: the same train/val images and labels as the source, no test split,
    every file's sha256 as ``manifest.csv`` records it."""
    src, pack = load_index(data), load_index(dst)
    assert pack.source == "manifest.csv", pack.source
    assert not pack.split("test"), "test images in the pack"
    for sp in SPLITS:
        want = {(s.rel, s.label) for s in _pick(src, limit) if s.split == sp}
        got = {(s.rel, s.label) for s in pack.split(sp)}
        assert want == got, f"{sp}: pack differs from the source ({len(want ^ got)} images)"
    with (dst / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["orig_split"] != "test" for r in rows)
    bad = [r["path"] for r in rows if sha256_file(dst / r["path"]) != r["sha256"]]
    assert not bad, f"sha256 mismatch: {bad[:3]}"
    return {sp: len(pack.split(sp)) for sp in ("train", "val", "test")}


def pack_init(v1: Path, dst: Path, data: Path) -> dict:
    """The v1 members' weights as fp16 safetensors, and how far fp16 moves their logits on 32
    real validation images (224 px, the v1 size)."""
    import torch
    from safetensors.torch import load_file, save_file

    from bonefrac.data.dataset import decode_all
    from bonefrac.inference.model_folder import ModelFolder
    from bonefrac.models.net import load_member

    folder = ModelFolder.open(v1)
    val = load_index(data).split("val")[:32]
    gray = decode_all(val, 224, resize="stretch").images
    out = {}
    for spec in folder.members:
        src = folder.member_file(spec, "weights")  # sha256-checked
        sd = load_file(str(src))
        half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
        path = dst / f"{spec['arch']}.safetensors"
        save_file(half, str(path))
        z = []
        for f in (src, path):  # load_state_dict casts the fp16 values to the fp32 model
            m = load_member(spec["arch"], spec["config"], f, spec["preprocessing"])
            with torch.inference_mode():
                z.append(m(torch.from_numpy(m.preprocessing(gray))).numpy())
        d = z[1] - z[0]
        out[spec["arch"]] = {"file": str(path), "bytes": path.stat().st_size,
                             "source_sha256": spec["weights_sha256"],
                             "max_abs_logit_diff_fp16": float(np.abs(d).max()),
                             "max_abs_margin_logit": float(np.abs(z[0][:, 1] - z[0][:, 0]).max())}
    return out


def repo_root() -> Path:
    return Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                               text=True, check=True).stdout.strip())


def ensure_ignored(path: Path) -> str | None:
    """Add the pack's top folder (``.gpu/``) to ``.git/info/exclude`` unless git ignores it."""
    repo = repo_root()
    try:
        top = path.resolve().relative_to(repo).parts[0]
    except ValueError:
        return None  # outside the repo: it cannot travel anyway
    if subprocess.run(["git", "check-ignore", "-q", top], cwd=repo).returncode == 0:
        return None
    exclude = repo / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as f:
        f.write(f"/{top}/\n")
    return f"/{top}/ added to {exclude}"


def _tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() or f.is_symlink())


def travel_size(repo: Path, carry: list[str]) -> dict:
    """Bytes a ``run`` call from ``repo`` would send: tracked files present on disk, untracked
    files git does not ignore, and the carried paths (relative to ``repo``); the largest
    contributors in the tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True).stdout.decode()
    by_top: dict[str, int] = {}
    for rel in filter(None, out.split("\0")):
        p = repo / rel
        if p.is_file() or p.is_symlink():
            parts = Path(rel).parts
            key = "/".join(parts[:4] if rel.startswith("src/bonefrac/pretrained/") else parts[:1])
            by_top[key] = by_top.get(key, 0) + p.lstat().st_size
    tree = sum(by_top.values())
    carried = {c: _tree_bytes(repo / c) if (repo / c).exists() else 0 for c in carry}
    total = tree + sum(carried.values())
    mib = 2**20
    return {"tree_mib": round(tree / mib, 2), "carry_mib": {k: round(v / mib, 2)
                                                            for k, v in carried.items()},
            "total_mib": round(total / mib, 2), "limit_mib": LIMIT_MIB,
            "fits": total <= LIMIT_MIB * mib,
            "largest_in_tree_mib": {k: round(v / mib, 2) for k, v in
                                    sorted(by_top.items(), key=lambda kv: -kv[1])[:6]}}


def archive(dst: Path) -> None:
    """``dst/data/`` -> ``dst/data.zip`` (stored: JPEGs do not compress), folder removed."""
    with zipfile.ZipFile(dst / "data.zip.tmp", "w", zipfile.ZIP_STORED) as z:
        for f in sorted((dst / "data").rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(dst).as_posix())
    (dst / "data.zip.tmp").replace(dst / "data.zip")
    shutil.rmtree(dst / "data")


def build(a) -> int:
    data, dst = Path(a.data), Path(a.out)
    if dst.exists() and any(dst.iterdir()) and not (dst / "PACK.json").exists():
        raise SystemExit(f"{dst}: exists and is not a pack (no PACK.json); choose another folder")
    if dst.exists():
        shutil.rmtree(dst)  # an earlier pack
    (dst / "data").mkdir(parents=True)
    (dst / "init").mkdir()
    res = {"pack": str(dst), "note": "train and validation splits only; no test image"}
    res["ignored"] = ensure_ignored(dst)
    res["copied"] = copy_images(data, dst / "data", a.limit)
    res["splits_in_pack"] = check_pack(data, dst / "data", a.limit)
    res["init"] = pack_init(Path(a.init), dst / "init", data)
    if a.zip:
        archive(dst)
    res["data"] = "data.zip" if a.zip else "data/"
    res["mib"] = round(_tree_bytes(dst) / 2**20, 2)
    write_json(dst / "PACK.json", res)
    print(json.dumps(res, indent=1))
    return 0


def size(a) -> int:
    res = travel_size(repo_root(), a.carry)
    print(json.dumps(res, indent=1))
    return 0 if res["fits"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="copy train+val images, CSVs and fp16 v1 weights")
    b.add_argument("data", help="the data set folder (manifest.csv with the canonical split)")
    b.add_argument("out", help="pack folder inside the repo, e.g. .gpu/v2 (replaced)")
    b.add_argument("--limit", type=int, default=None,
                   help="at most this many images per split (both classes): a smoke pack")
    b.add_argument("--zip", action="store_true",
                   help="store data/ as one uncompressed data.zip (v2_gpu.py unpacks it)")
    b.add_argument("--init", default=V1, help=f"ensemble to warm-start from (default {V1})")
    s = sub.add_parser("size", help="what a device run call would send, against 64 MiB")
    s.add_argument("--carry", nargs="*", default=[], help="paths named in the call's carry")
    a = ap.parse_args()
    return build(a) if a.cmd == "build" else size(a)


if __name__ == "__main__":
    sys.exit(main())
