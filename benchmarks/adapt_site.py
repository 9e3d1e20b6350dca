"""`bonefrac adapt` on site folders built from the canonical data set; prints JSON.

    # time a 300-image site adapted from the shipped v2 ensemble (the README's measurement)
    python benchmarks/adapt_site.py --data ../shared/data/bone-fracture timing --out /tmp/site
    # the site-shift experiment of tests/test_adapt.py: a parent trained without one body
    # region, adapted on that region's images
    python benchmarks/adapt_site.py --data ../shared/data/bone-fracture shift --out /tmp/shift

Site folders hold copies of the files (``fractured/``, ``non_fractured/``), a ``manifest.csv``
with their own train/val/test split, the data set's copy groups (``groups.csv``: one image per
group is taken) and the matching rows of ``boxes.csv``. Only fractured
images carry a body region (the YOLO class of their boxes), so a "region site" is that
region's fractured images plus non-fractured images the parent never saw.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

SPLIT_SHARES = (("train", 0.6), ("val", 0.2), ("test", 0.2))
HUMERUS = ("3", "4")  # "humerus fracture", "humerus": absent from tests/data and its parent


def _rows(data: Path) -> list[dict]:
    """Manifest rows with their group, YOLO classes and canonical split."""
    with open(data / "groups.csv", newline="") as f:
        groups = {r["path"]: r for r in csv.DictReader(f)}
    with open(data / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    out = []
    for r in manifest:
        g = groups.get(r["path"], {})
        out.append({"path": r["path"], "label": r["label"], "split": r["orig_split"],
                    "group": g.get("group_id", r["path"]),
                    "classes": set(g.get("yolo_classes", "").split())})
    return out


def one_per_group(rows: Sequence[dict], seed: int) -> list[dict]:
    """One image per group of augmented copies (copies would leak across the site's split)."""
    rng, seen, out = random.Random(seed), set(), []
    for r in sorted(rows, key=lambda r: r["path"]):
        if r["group"] not in seen:
            seen.add(r["group"])
            out.append(r)
    rng.shuffle(out)
    return out


def write_site(data: Path, out: Path, pos: Sequence[dict], neg: Sequence[dict]) -> Path:
    """Copy ``pos`` + ``neg`` into ``out`` with a stratified 60/20/20 split of their own."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for group in (pos, neg):
        n, start = len(group), 0
        for i, (split, share) in enumerate(SPLIT_SHARES):
            stop = n if i == len(SPLIT_SHARES) - 1 else start + round(share * n)
            rows += [{**r, "site_split": split} for r in group[start:stop]]
            start = stop
    for r in rows:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data / r["path"], out / r["path"])
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([r["path"], r["label"], r["site_split"]] for r in rows)
    with open(out / "groups.csv", "w", newline="") as f:  # the data set's own copy groups
        w = csv.writer(f)
        w.writerow(["path", "group_id"])
        w.writerows([r["path"], r["group"]] for r in rows)
    keep = {r["path"] for r in rows}
    with open(data / "boxes.csv") as f, open(out / "boxes.csv", "w", newline="") as g:
        reader = csv.DictReader(f)
        w = csv.DictWriter(g, fieldnames=reader.fieldnames)
        w.writeheader()
        w.writerows(r for r in reader if r["path"] in keep)
    return out


def region_sites(data: Path, out: Path, region: Sequence[str], *, n_base: int, n_site: int,
                 seed: int = 0) -> tuple[Path, Path]:
    """(base, site) folders: ``base`` has fractured images of every region but ``region``
    (``n_base`` images, half fractured), ``site`` that region's fractured images and other
    non-fractured ones (``n_site``, half fractured). No image or copy group is in both."""
    rows = _rows(data)
    reg = set(region)
    site_pos = one_per_group([r for r in rows if r["label"] == "fractured"
                              and r["classes"] & reg], seed)[:n_site // 2]
    base_pos = one_per_group([r for r in rows if r["label"] == "fractured"
                              and r["classes"] and not r["classes"] & reg], seed)[:n_base // 2]
    neg = one_per_group([r for r in rows if r["label"] == "non_fractured"], seed)
    base_neg, site_neg = neg[:n_base // 2], neg[n_base // 2:n_base // 2 + n_site // 2]
    return (write_site(data, out / "base", base_pos, base_neg),
            write_site(data, out / "site", site_pos, site_neg))


def unseen_site(data: Path, out: Path, n: int, seed: int = 0) -> Path:
    """A site of ``n`` images (half fractured) from the canonical val and test splits, which
    the shipped models never trained on."""
    rows = [r for r in _rows(data) if r["split"] in ("valid", "test")]
    pos = one_per_group([r for r in rows if r["label"] == "fractured"], seed)[:n // 2]
    neg = one_per_group([r for r in rows if r["label"] == "non_fractured"], seed)[:n - n // 2]
    return write_site(data, out, pos, neg)


def shift_experiment(data: Path, out: Path, *, size: int = 64, n_base: int = 240,
                     n_site: int = 240, arch: str = "mobilenetv2") -> dict:
    """Train a one-member parent on ``base`` (no humerus fractures), adapt it on ``site``
    (humerus fractures), and return both models' validation and test AUC on the site."""
    from bonefrac.data.dataset import load_index
    from bonefrac.evaluation.evaluate import collect, member_probs
    from bonefrac.evaluation.metrics import roc_auc
    from bonefrac.inference.ensemble import Ensemble, fuse
    from bonefrac.training import TrainConfig, train
    from bonefrac.training.adapt import AdaptConfig, adapt
    from bonefrac.training.fit import fit_ensemble

    base, site = region_sites(data, out / "data", HUMERUS, n_base=n_base, n_site=n_site)
    t0 = time.time()
    run = train(base, out / "parent_run", TrainConfig(arch=arch, size=size, epochs_frozen=3,
                                                      epochs_finetune=2, views=2,
                                                      batch_size=16), finalize=False)
    fit_ensemble([run], load_index(base), out / "parent", model_id="parent-no-humerus")
    t_parent = time.time() - t0
    res = adapt(out / "parent", site, out / "adapted",
                cfg=AdaptConfig(epochs=4, lr=3e-4, views=2, batch_size=32))
    index = load_index(site)

    def auc(model: Path, split: str) -> float:
        ens = Ensemble.load(model, backend="onnx")
        so = collect(ens, index.split(split), desc=split)
        return roc_auc(so.y, fuse(member_probs(ens, so.logits), ens.weights))

    cmp = res["evaluation"]["compared_with"]
    return {"region": "humerus", "size": size, "n_base": n_base, "site": res["site"],
            "parent_seconds": round(t_parent, 1), "adapt_seconds": round(res["seconds"], 1),
            "val_auc": {"parent": auc(out / "parent", "val"),
                        "adapted": auc(out / "adapted", "val")},
            "test_auc": {"parent": auc(out / "parent", "test"),
                         "adapted": auc(out / "adapted", "test")},
            "test_auc_diff": cmp["auc_diff"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the bone-fracture data set")
    ap.add_argument("mode", choices=("timing", "shift"))
    ap.add_argument("--out", required=True, help="work folder (new)")
    ap.add_argument("--model", default="ensemble", help="timing: the parent model")
    ap.add_argument("--n", type=int, default=300, help="timing: site images")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if args.mode == "shift":
        print(json.dumps(shift_experiment(data, out), indent=2))
        return 0
    from bonefrac.training.adapt import adapt

    site = unseen_site(data, out / "site", args.n)
    res = adapt(args.model, site, out / "adapted")
    cmp = res["evaluation"]["compared_with"]
    print(json.dumps({"parent": res["parent"], "site": res["site"],
                      "seconds": round(res["seconds"], 1),
                      "adapted_test_auc": res["evaluation"]["metrics"]["roc_auc"],
                      "test_auc_diff": cmp["auc_diff"], "errors": cmp["errors"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
