"""``bonefrac adapt``: fit a shipped (or any) ensemble to a new site's labelled images.

Full adaptation: every member is warm-started from the parent's weights (never ImageNet) and
fine-tuned on the site's TRAINING split with the project's trainer (stage 2 only: the top
blocks, the head and, where the site has fracture boxes, the fracture map) at a low rate for a
few epochs, at the parent member's input size; then temperatures, fusion weights, thresholds,
operating points and the input-domain gate are refitted on the site's VALIDATION split
(:func:`bonefrac.training.fit.fit_ensemble`). ``recalibrate_only``: the parent's weights are
copied and only that refit is done (no torch needed). Either way parent and adapted model are
then evaluated on the site's TEST split side by side (paired bootstrap CI of the AUC
difference) in ``OUT/Results/``, and ``ensemble_meta.json`` records the parent (model id,
sha256 of its meta, which holds every member file's sha256) and the site data (file count,
manifest hash).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bonefrac import InputError
from bonefrac.data.dataset import DatasetIndex, load_index
from bonefrac.evaluation.domain_fit import fit_folder_gate
from bonefrac.evaluation.evaluate import evaluate_model
from bonefrac.inference.model_folder import META_NAME, ModelFolder
from bonefrac.utils import sha256_file, write_json


@dataclass(frozen=True)
class AdaptConfig:
    """The fine-tuning recipe of ``bonefrac adapt`` (measured: a 300-image site in minutes on
    2 CPU cores, see README). Low rate, few epochs: the parent is already a good start."""

    epochs: int = 4  # stage 2 epochs (early stopping on validation AUC, best restored)
    lr: float = 1e-4  # one-cycle peak: a third of the recipe's 3e-4
    views: int = 4  # cached views per training image (1 clean + 3 augmented)
    unfreeze_blocks: int = 12  # as the recipe
    batch_size: int = 32
    seed: int = 0


def site_record(index: DatasetIndex) -> dict:
    """What the adapted model saw: the site folder, file count per split and hashes."""
    manifest = index.root / "manifest.csv"
    return {"data": str(index.root), "n_files": len(index.samples),
            "splits": {sp: len(index.split(sp)) for sp in ("train", "val", "test")},
            "split_source": index.source, "manifest_sha256": index.fingerprint(),
            "manifest_csv_sha256": sha256_file(manifest) if manifest.is_file() else None}


def parent_record(parent: ModelFolder) -> dict:
    return {"model_id": parent.meta.get("model_id", parent.root.name),
            "path": str(parent.root),
            "meta_sha256": sha256_file(parent.root / META_NAME)}


def _check_site(index: DatasetIndex, recalibrate_only: bool) -> None:
    """Refuse a site that cannot be fitted or evaluated, before any work, naming the split."""
    need = ("val", "test") if recalibrate_only else ("train", "val", "test")
    for sp in need:
        labels = {s.label for s in index.split(sp)}
        if labels != {0, 1}:
            raise InputError(f"{index.root}: the {sp} split needs fractured and non_fractured "
                             f"images (has {len(index.split(sp))} image(s), labels "
                             f"{sorted(labels)})")


def adapt(model: str | Path, data: str | Path, out: str | Path, *,
          recalibrate_only: bool = False, cfg: AdaptConfig = AdaptConfig(),
          model_id: str | None = None, device: str = "auto") -> dict:
    """Adapt ensemble ``model`` to the labelled site folder ``data``; write it to ``out``.

    Returns ``{"parent", "site", "seconds", "evaluation"}``: ``evaluation`` is
    :func:`~bonefrac.evaluation.evaluate.evaluate_model`'s result on the site's test split,
    with ``compared_with`` holding parent vs adapted (``auc_diff`` with its 95% CI).
    """
    t0 = time.time()
    parent = ModelFolder.open(model)
    if parent.is_run:
        raise InputError(f"{parent.root}: a training run, not an ensemble folder; export it "
                         "first (`bonefrac export`)")
    out = Path(out)
    if out.resolve() == parent.root.resolve():
        raise InputError(f"--out {out} is the parent model's folder; choose a new folder")
    if (out / META_NAME).exists():
        raise FileExistsError(f"{out} already holds a model; choose a new --out")
    index = load_index(data, seed=cfg.seed)
    print(index.summary(), flush=True)
    _check_site(index, recalibrate_only)
    record = {"parent": parent_record(parent), "site": site_record(index),
              "adapt": {"mode": "recalibrate-only" if recalibrate_only else "fine-tune",
                        **({} if recalibrate_only else cfg.__dict__)}}
    new_id = model_id or f"{record['parent']['model_id']}+{index.root.name}" + (
        "-recalibrated" if recalibrate_only else "-adapted")
    fit_weights = _fit_weights(parent.meta)
    policy = parent.meta.get("threshold_policy", "sensitivity:0.95")
    if recalibrate_only:
        result = _recalibrate(parent, index, out, new_id, record, fit_weights, policy)
    else:
        result = _fine_tune(parent, index, out, new_id, record, fit_weights, policy, cfg,
                            device)
    seconds = time.time() - t0
    meta = ModelFolder.open(out).meta
    meta["adapt"]["seconds"] = round(seconds, 1)
    write_json(out / META_NAME, meta)
    return {**record, "model_id": new_id, "seconds": seconds, "evaluation": result}


def _fit_weights(meta: dict) -> str | None:
    """Refit the fusion weights the way the parent's were fitted."""
    how = str(meta.get("weights_how", ""))
    return "logloss" if "logloss" in how else "auc" if "auc" in how else None


def _recalibrate(parent: ModelFolder, index: DatasetIndex, out: Path, new_id: str,
                 record: dict, fit_weights: str | None, policy: str) -> dict:
    """Copy the parent's member files, refit calibration, thresholds and gate on ONNX."""
    from bonefrac.training.fit import refit_on_validation

    out.mkdir(parents=True, exist_ok=True)
    meta = parent.meta
    for spec in meta["members"]:
        for key in ("onnx", "weights", "history"):
            if spec.get(key):
                shutil.copy2(parent.root / spec[key], out / spec[key])
    for k in ("domain_gate", "domain_gate_skipped", "validation", "fitted_on"):
        meta.pop(k, None)  # refitted below: nothing of the parent's fit may linger
    meta.update(model_id=new_id, **record)
    write_json(out / META_NAME, meta)
    refit_on_validation(out, index, fit_weights=fit_weights, policy=policy, backend="onnx")
    fit_folder_gate(out, index, backend="onnx")
    return evaluate_model(out, index, split="test", compare_with=parent.root)


def _fine_tune(parent: ModelFolder, index: DatasetIndex, out: Path, new_id: str, record: dict,
               fit_weights: str | None, policy: str, cfg: AdaptConfig, device: str) -> dict:
    """Fine-tune each member from the parent's weights, then build the ensemble."""
    from bonefrac.training.fit import fit_ensemble

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".adapt_runs_") as tmp:
        runs = [_train_member(parent, spec, index, Path(tmp) / spec["name"], cfg, device)
                for spec in parent.members]
        return fit_ensemble(runs, index, out, fit_weights=fit_weights, policy=policy,
                            model_id=new_id, extra_meta=record, compare_with=parent.root)


def _train_member(parent: ModelFolder, spec: dict, index: DatasetIndex, run: Path,
                  cfg: AdaptConfig, device: str) -> Path:
    """One member fine-tuned from the parent's weights into the run folder ``run``."""
    from bonefrac.training import TrainConfig, train

    conf, prep = spec.get("config", {}), spec["preprocessing"]
    boxes = (index.root / "boxes.csv").is_file()
    has_loc = bool(conf.get("loc_head"))
    init = init_weights(parent, spec, run.parent, keep_loc=boxes)
    tc = TrainConfig(arch=spec["arch"], init_from=str(init), epochs_frozen=0,
                     epochs_finetune=cfg.epochs, views=cfg.views, lr_finetune=cfg.lr,
                     unfreeze_blocks=cfg.unfreeze_blocks, batch_size=cfg.batch_size,
                     hidden=conf.get("hidden", 256), dropout=conf.get("dropout", 0.3),
                     size=prep["size"], resize=prep.get("resize", "stretch"), seed=cfg.seed,
                     loc_weight=1.0 if has_loc and boxes else 0.0)
    print(f"adapting {spec['name']}: {cfg.epochs} epoch(s) at peak rate {cfg.lr} from "
          f"{parent.root.name}", flush=True)
    train(index.root, run, tc, index=index, finalize=False, device=device)
    if has_loc and not boxes:
        restore_loc_head(run, parent, spec)
    return run


LOC_PREFIX = "loc."  # the fracture-map head's tensors in a member's state dict


def init_weights(parent: ModelFolder, spec: dict, tmp: Path, keep_loc: bool) -> Path:
    """The parent member's safetensors (sha256-checked) to warm-start from; without site
    boxes, a copy without the fracture-map head (the trainer then trains none; the parent's is
    put back by :func:`restore_loc_head`)."""
    from safetensors.torch import load_file

    from bonefrac.models.weights import save_tensors

    path = parent.member_file(spec, "weights")
    if keep_loc or not spec.get("config", {}).get("loc_head"):
        return path
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(LOC_PREFIX)}
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{spec['name']}_init.safetensors"
    save_tensors(tensors, out)
    return out


def restore_loc_head(run: Path, parent: ModelFolder, spec: dict) -> None:
    """Put the parent's fracture-map head into the adapted run (a site without boxes cannot
    train it; the fine-tuned top blocks move under it a little at the low adapt rate)."""
    import json

    from safetensors.torch import load_file

    from bonefrac.models.weights import save_tensors

    old = load_file(str(parent.member_file(spec, "weights")))
    new = load_file(str(run / "model.safetensors"))
    new.update({k: v for k, v in old.items() if k.startswith(LOC_PREFIX)})
    save_tensors(new, run / "model.safetensors")
    mj = json.loads((run / "model.json").read_text())
    mj.update(loc_head=True, heatmap=spec["config"].get("heatmap", "fracture_map"),
              loc_note="fracture-map head copied from the parent (the site has no boxes.csv)")
    write_json(run / "model.json", mj)
