"""Validation ROC-AUC of trained runs, of their output average and of their weight average.

Model soups (Wortsman et al., 2022): fine-tuning runs that start from the same weights can often
be averaged weight-for-weight into one model as good as their output average, at one model's
inference cost. This measures it on the VALIDATION split only (the test split is never read).

    python experiments/recipe_sweep/soup_val.py --data ../shared/data/bone-fracture \
        --group runs/mnv2_a runs/mnv2_b --group runs/lite0_a runs/lite0_b

Each ``--group`` holds runs of one architecture. With two groups it also prints the equal-weight
fusion of the two groups' first runs and of the two soups. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from bonefrac.data.dataset import load_index
from bonefrac.evaluation.evaluate import collect
from bonefrac.evaluation.metrics import roc_auc
from bonefrac.inference.ensemble import Ensemble
from bonefrac.training.trainer import average_weights


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def val_logit(run: Path, samples) -> tuple[np.ndarray, np.ndarray]:
    """(labels, ``z_fractured - z_non``) of ``run`` on the validation samples, each ``(N,)``,
    through bonefrac's own evaluation path (decode, preprocess, member forward)."""
    ens = Ensemble.load(run, backend="torch", verify=False)  # a soup has no recorded sha256
    out = collect(ens, samples, desc=f"validation {run.name}")
    z = out.logits[ens.members[0].name]
    return out.y, z[:, 1] - z[:, 0]


def measure(runs: list[Path], samples, tmp: Path) -> dict:
    meta = [json.loads((r / "model.json").read_text()) for r in runs]
    if len({m["arch"] for m in meta}) != 1:
        raise SystemExit(f"one architecture per group: {[m['arch'] for m in meta]}")
    z = {}
    for r in runs:
        y, z[str(r)] = val_logit(r, samples)
    soup = tmp / f"soup_{meta[0]['arch']}"  # a run folder: the first run's model.json
    soup.mkdir()
    shutil.copy2(runs[0] / "model.json", soup / "model.json")
    save_file(average_weights([load_file(str(r / m["weights_file"]))
                               for r, m in zip(runs, meta, strict=True)]),
              str(soup / meta[0]["weights_file"]))
    _, z_soup = val_logit(soup, samples)
    p_avg = np.mean([_sigmoid(v) for v in z.values()], axis=0)
    return {"y": y, "z_first": next(iter(z.values())), "z_soup": z_soup, "result": {
        "arch": meta[0]["arch"], "runs": {k: round(roc_auc(y, v), 4) for k, v in z.items()},
        "output_average": round(roc_auc(y, p_avg), 4), "soup": round(roc_auc(y, z_soup), 4)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--group", nargs="+", action="append", required=True, type=Path)
    args = ap.parse_args()
    samples = load_index(args.data).split("val")
    with tempfile.TemporaryDirectory() as tmp:
        groups = [measure(g, samples, Path(tmp)) for g in args.group]
    out = {"split": "val", "n": len(groups[0]["y"]), "groups": [g["result"] for g in groups]}
    if len(groups) == 2:
        a, b = groups
        fuse = lambda k: round(roc_auc(a["y"], (_sigmoid(a[k]) + _sigmoid(b[k])) / 2), 4)  # noqa: E731
        out["equal_weight_fusion"] = {"first_runs": fuse("z_first"), "soups": fuse("z_soup")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
