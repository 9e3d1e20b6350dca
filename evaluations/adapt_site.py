"""`bonefrac adapt` on site folders built from the canonical data set; prints JSON.

    # time a 300-image site adapted from the shipped v2 ensemble (the README's measurement)
    python evaluations/adapt_site.py --data ../shared/data/bone-fracture timing --out /tmp/site
    # the site-shift experiment of tests/test_adapt.py: a parent trained without one body
    # region, adapted on that region's images
    python evaluations/adapt_site.py --data ../shared/data/bone-fracture shift --out /tmp/shift
    # the adapt recipe by cross-validation on a labelled site ONLY (its images are never a
    # base model's training data): per fold, adapt on the other folds (80/20 train/val) and
    # score the held-out fold; the canonical test split before / after measures forgetting
    python evaluations/adapt_site.py --data ../shared/data/bone-fracture cv \
        --site ../shared/data/fracatlas-site --out /tmp/cv --folds 3 --recipes recal,ft,ft-light

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

from bonefrac.utils import write_json

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


# Recipes compared by `cv`: (recalibrate_only, AdaptConfig overrides).
RECIPES = {"recal": (True, {}),
           "ft": (False, {}),  # the default: 4 epochs, peak rate 1e-4, 4 views
           "ft-light": (False, {"epochs": 3, "views": 2})}


def site_folds(site: Path, k: int, seed: int = 0) -> list[list[dict]]:
    """The site's manifest rows in ``k`` folds: whole near-duplicate groups, each label spread
    evenly (each group goes to the fold with the fewest images of its label so far)."""
    with open(site / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group_id") or r["path"], []).append(r)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    folds: list[list[dict]] = [[] for _ in range(k)]
    for g in order:
        label = groups[g][0]["label"]
        dest = min(range(k), key=lambda i: (sum(r["label"] == label for r in folds[i]), i))
        folds[dest] += groups[g]
    return folds


def write_fold_site(site: Path, out: Path, folds: list[list[dict]], k: int) -> Path:
    """A site folder whose test split is fold ``k``; the others are split 80/20 train/val
    (every fifth group per label to val)."""
    rows, seen = [], {"fractured": 0, "non_fractured": 0}
    for i, fold in enumerate(folds):
        for g in sorted({r.get("group_id") or r["path"] for r in fold}):
            members = [r for r in fold if (r.get("group_id") or r["path"]) == g]
            if i == k:
                split = "test"
            else:
                seen[members[0]["label"]] += 1
                split = "val" if seen[members[0]["label"]] % 5 == 0 else "train"
            rows += [{**r, "split": split} for r in members]
    for r in rows:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site / r["path"], out / r["path"])
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group_id"])
        w.writerows([r["path"], r["label"], r["split"], r.get("group_id", "")] for r in rows)
    shutil.copy2(site / "groups.csv", out / "groups.csv")  # the site's own groups, no re-hash
    return out


def canonical_auc(model: Path | str, data: Path, out: Path) -> dict:
    """AUC (with its bootstrap CI) on the canonical test split: the forgetting check."""
    from bonefrac.data.dataset import load_index
    from bonefrac.evaluation.evaluate import evaluate_model

    ev = evaluate_model(model, load_index(data), split="test", out=out)
    return {"value": ev["metrics"]["roc_auc"]["value"], "ci95": ev["metrics"]["roc_auc"]["ci95"]}


def cv_experiment(data: Path, site: Path, out: Path, *, folds: int = 3,
                  recipes: Sequence[str] = ("recal", "ft"), model: str = "ensemble") -> dict:
    """Cross-validated parent (zero-shot) and adapted AUC on the site's held-out folds, per
    recipe, and the canonical test AUC after adaptation. Results are rewritten to
    ``out/cv_results.json`` after every run, so a cut-short experiment keeps what it measured."""
    from bonefrac.cli.common import resolve_model
    from bonefrac.training.adapt import AdaptConfig, adapt

    parent = resolve_model(model)
    parts = site_folds(site, folds)
    res: dict = {"site": str(site), "folds": folds, "fold_sizes": [len(f) for f in parts],
                 "parent_canonical_test_auc": canonical_auc(parent, data, out / "canon_parent"),
                 "runs": []}
    for name in recipes:  # recipe outer: a cut-short run has every fold of the first ones
        recal, over = RECIPES[name]
        for k in range(folds):
            fold_site = write_fold_site(site, out / f"site_fold{k}", parts, k) \
                if not (out / f"site_fold{k}").exists() else out / f"site_fold{k}"
            dst = out / f"{name}_fold{k}"
            r = adapt(parent, fold_site, dst, recalibrate_only=recal,
                      cfg=AdaptConfig(**over))
            cmp = r["evaluation"]["compared_with"]
            auc = r["evaluation"]["metrics"]["roc_auc"]["value"]
            res["runs"].append({
                "recipe": name, "fold": k, "seconds": round(r["seconds"], 1),
                "n_test": r["evaluation"]["n"], "site_auc_adapted": auc,
                "site_auc_parent": auc - cmp["auc_diff"]["value"], "auc_diff": cmp["auc_diff"],
                "errors": cmp["errors"],
                "canonical_test_auc": canonical_auc(dst, data, out / f"canon_{name}_{k}")})
            res["summary"] = cv_summary(res["runs"])
            write_json(out / "cv_results.json", res)
    return res


def cv_summary(runs: Sequence[dict]) -> dict:
    """Mean and sample standard deviation over folds, per recipe."""
    import numpy as np

    out = {}
    for name in dict.fromkeys(r["recipe"] for r in runs):
        rs = [r for r in runs if r["recipe"] == name]
        out[name] = {"n_folds": len(rs)}
        for key, get in (("site_auc_parent", lambda r: r["site_auc_parent"]),
                         ("site_auc_adapted", lambda r: r["site_auc_adapted"]),
                         ("site_auc_diff", lambda r: r["auc_diff"]["value"]),
                         ("canonical_test_auc", lambda r: r["canonical_test_auc"]["value"]),
                         ("minutes", lambda r: r["seconds"] / 60)):
            v = np.array([get(r) for r in rs], float)
            out[name][key] = {"mean": round(float(v.mean()), 4),
                              "sd": round(float(v.std(ddof=1)), 4) if v.size > 1 else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the bone-fracture data set")
    ap.add_argument("mode", choices=("timing", "shift", "cv"))
    ap.add_argument("--site", help="cv: the labelled site folder (e.g. fracatlas-site)")
    ap.add_argument("--folds", type=int, default=3, help="cv: folds")
    ap.add_argument("--recipes", default="recal,ft", help=f"cv: of {', '.join(RECIPES)}")
    ap.add_argument("--out", required=True, help="work folder (new)")
    ap.add_argument("--model", default="ensemble", help="timing: the parent model")
    ap.add_argument("--n", type=int, default=300, help="timing: site images")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if args.mode == "shift":
        print(json.dumps(shift_experiment(data, out), indent=2))
        return 0
    if args.mode == "cv":
        res = cv_experiment(data, Path(args.site), out, folds=args.folds,
                            recipes=args.recipes.split(","), model=args.model)
        print(json.dumps(res["summary"], indent=2))
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
