"""``bonefrac adapt``: fit a shipped (or any) ensemble to a new site's labelled images.

Full adaptation: every member is warm-started from the parent's weights (never ImageNet) and
fine-tuned on the site's TRAINING split with the project's trainer (stage 2 only: the top
blocks, the head and, where the site has fracture boxes, the fracture map) at a low rate for a
few epochs, at the parent member's input size; then temperatures, fusion weights, thresholds,
operating points and the input-domain gate are refitted on the site's VALIDATION split
(:func:`bonefrac.training.fit.fit_ensemble`). ``recalibrate_only``: the parent's weights are
copied and only that refit is done (no torch needed); as the parent never saw any site image,
a small validation split is pooled with the training split for it, and the parent's gate is
kept unless the site has enough training images to refit one. With a TEST split, parent and
adapted model are then evaluated on it side by side (paired bootstrap CI of the AUC
difference) in ``OUT/Results/``; without one the comparison is skipped and the output says
so. What was fitted on how many images, and what is unreliable, is decided before any work
(:func:`plan_fit`), printed, and kept in ``ensemble_meta.json`` (``adapt.fitted``,
``adapt.notes``) beside the parent (model id, sha256 of its meta, which holds every member
file's sha256) and the site data (file count, manifest hash).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bonefrac import CLASSES, InputError
from bonefrac.data.dataset import DatasetIndex, Sample, load_index
from bonefrac.evaluation.domain_fit import MIN_TRAIN, fit_folder_gate
from bonefrac.evaluation.evaluate import evaluate_model
from bonefrac.evaluation.metrics import wilson_ci
from bonefrac.inference.domain import GATE_FILE
from bonefrac.inference.model_folder import META_NAME, ModelFolder, write_meta
from bonefrac.inference.spec import read_run_meta, write_run_meta
from bonefrac.utils import sha256_file


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


# A fit of temperatures and thresholds on fewer validation images than this, or fewer than
# SMALL_CLASS of a class, is unreliable: the output, the meta and the model card say so.
SMALL_VAL, SMALL_CLASS = 100, 30


@dataclass
class FitPlan:
    """What ``adapt`` fits on which images, decided from the split sizes before any work."""

    calibration: str  # "val", or "train+val" (recalibrate-only: the parent saw neither)
    gate: str  # "refit" on the site, "parent" (kept), or "none"
    evaluate: bool  # the site has a test split: compare parent and adapted model on it
    fitted: dict[str, str] = field(default_factory=dict)  # what -> on which images, how many
    notes: list[str] = field(default_factory=list)  # what is unreliable or skipped, and why


def _counts(samples: Sequence[Sample]) -> str:
    c = Counter(s.label for s in samples)
    return f"{len(samples)} images ({c[1]} {CLASSES[1]} / {c[0]} {CLASSES[0]})"


def is_small(samples: Sequence[Sample]) -> bool:
    """Too few images (or of one class) for a fit of temperatures and thresholds to be trusted."""
    c = Counter(s.label for s in samples)
    return len(samples) < SMALL_VAL or min(c[0], c[1]) < SMALL_CLASS


def _check_site(index: DatasetIndex, recalibrate_only: bool) -> None:
    """Refuse a site that cannot be fitted or evaluated, before any work, naming the split."""
    need = ["val"] if recalibrate_only else ["train", "val"]
    for sp in need + (["test"] if index.split("test") else []):
        labels = {s.label for s in index.split(sp)}
        if labels != {0, 1}:
            raise InputError(f"{index.root}: the {sp} split needs fractured and non_fractured "
                             f"images (has {len(index.split(sp))} image(s), labels "
                             f"{sorted(labels)})")


def plan_fit(index: DatasetIndex, recalibrate_only: bool, policy: str,
             parent_gate: bool = True) -> FitPlan:
    """Which images each fit uses, and the warnings the sizes call for. ``parent_gate``: the
    parent has a learned domain gate (kept by recalibration when the site is too small)."""
    train, val, test = (index.split(sp) for sp in ("train", "val", "test"))
    pooled = recalibrate_only and is_small(val) and bool(train)
    cal = train + val if pooled else val
    plan = FitPlan("train+val" if pooled else "val",
                   "refit" if len(train) >= MIN_TRAIN else
                   "parent" if recalibrate_only and parent_gate else "none", bool(test))
    if not recalibrate_only:
        plan.fitted["weights (fine-tuned)"] = f"training split, {_counts(train)}"
    plan.fitted["temperatures, fusion weights, thresholds, operating points"] = (
        f"{'training + validation splits' if pooled else 'validation split'}, {_counts(cal)}")
    if pooled:
        plan.notes.append(f"the validation split is small ({_counts(val)}): calibration and "
                          "thresholds were fitted on training + validation pooled (the "
                          "parent's weights saw none of them)")
    if is_small(cal):
        plan.notes.append(_small_fit_note(cal, policy))
    plan.fitted["domain gate"] = _gate_line(plan.gate, train, val)
    if plan.gate != "refit":
        plan.notes.append(_gate_note(plan.gate, len(train), recalibrate_only))
    plan.fitted["comparison with the parent"] = (
        f"test split, {_counts(test)}" if test else "none: the site has no test split")
    if not test:
        plan.notes.append("no test split: parent and adapted model were not compared on "
                          "held-out site images; evaluate on labelled images not used here "
                          "(`bonefrac evaluate --model OUT --data DIR --split all`) before use")
    return plan


def _small_fit_note(cal: Sequence[Sample], policy: str) -> str:
    """Why a fit on ``cal`` is unreliable, with the uncertainty of a sensitivity target."""
    n_pos = sum(s.label for s in cal)
    note = (f"temperatures and thresholds were fitted on only {_counts(cal)} (< {SMALL_VAL}, "
            f"or < {SMALL_CLASS} per class): UNRELIABLE")
    if policy.startswith("sensitivity:") and n_pos:
        target = float(policy.split(":", 1)[1])
        lo, hi = wilson_ci(round(target * n_pos), n_pos)
        note += (f"; a sensitivity of {target:.2f} measured on {n_pos} fractured images has a "
                 f"95% CI of [{lo:.2f}, {hi:.2f}]")
    return note + "; label more site images, or check the threshold on them, before use"


def _gate_line(gate: str, train: Sequence[Sample], val: Sequence[Sample]) -> str:
    if gate == "refit":
        return (f"refitted: features of the training split ({len(train)} images), limits on "
                f"the validation split ({len(val)} images)")
    return "kept from the parent (weights unchanged)" if gate == "parent" else "none"


def _gate_note(gate: str, n_train: int, recalibrate_only: bool) -> str:
    few = f"{n_train} site training images (< {MIN_TRAIN}) are too few to fit a domain gate"
    if gate == "parent":
        return (f"{few}: the parent's gate is kept; it measures distance from the PARENT's "
                "training images, so it may flag many of this site's images")
    why = "the parent has none" if recalibrate_only else "the fine-tuned weights void the parent's"
    return (f"{few}, and {why}: the adapted model has NO learned domain check (cheap checks "
            "only)" + ("" if recalibrate_only else "; use --recalibrate-only or label more"))


def adapt(model: str | Path, data: str | Path, out: str | Path, *,
          recalibrate_only: bool = False, cfg: AdaptConfig = AdaptConfig(),
          model_id: str | None = None, device: str = "auto", regroup: bool = False) -> dict:
    """Adapt ensemble ``model`` to the labelled site folder ``data``; write it to ``out``.

    ``regroup``: near-duplicate groups that straddle the manifest's splits are moved whole
    into one split (:func:`~bonefrac.data.dataset.load_index`) instead of refused.
    Returns ``{"parent", "site", "adapt", "model_id", "seconds", "evaluation"}``: ``adapt``
    holds ``fitted`` (what was fitted on which images) and ``notes`` (what is unreliable or
    skipped); ``evaluation`` is :func:`~bonefrac.evaluation.evaluate.evaluate_model`'s result
    on the site's test split, with ``compared_with`` holding parent vs adapted (``auc_diff``
    with its 95% CI), or None when the site has no test split.
    """
    t0 = time.time()
    parent, out = _open_parent(model, out)
    index = load_index(data, seed=cfg.seed, regroup=regroup)
    print(index.summary(), flush=True)
    _check_site(index, recalibrate_only)
    policy = parent.meta.get("threshold_policy", "sensitivity:0.95")
    plan = plan_fit(index, recalibrate_only, policy, bool(parent.meta.get("domain_gate")))
    record = {"parent": parent_record(parent), "site": site_record(index),
              "adapt": {"mode": "recalibrate-only" if recalibrate_only else "fine-tune",
                        **({} if recalibrate_only else cfg.__dict__),
                        "fitted": plan.fitted, "notes": plan.notes}}
    new_id = model_id or f"{record['parent']['model_id']}+{index.root.name}" + (
        "-recalibrated" if recalibrate_only else "-adapted")
    fit_weights = _fit_weights(parent.meta)
    if recalibrate_only:
        result = _recalibrate(parent, index, out, new_id, record, fit_weights, policy, plan)
    else:
        result = _fine_tune(parent, index, out, new_id, record, fit_weights, policy, cfg,
                            device)
    seconds = time.time() - t0
    meta = ModelFolder.open(out).meta
    meta["adapt"]["seconds"] = round(seconds, 1)
    write_meta(out, meta)
    return {**record, "model_id": new_id, "seconds": seconds, "evaluation": result or None}


def _open_parent(model: str | Path, out: str | Path) -> tuple[ModelFolder, Path]:
    """The parent ensemble, and ``out`` once it is known not to clobber a model."""
    parent = ModelFolder.open(model)
    if parent.is_run:
        raise InputError(f"{parent.root}: a training run, not an ensemble folder; export it "
                         "first (`bonefrac export`)")
    out = Path(out)
    if out.resolve() == parent.root.resolve():
        raise InputError(f"--out {out} is the parent model's folder; choose a new folder")
    if (out / META_NAME).exists():
        raise FileExistsError(f"{out} already holds a model; choose a new --out")
    return parent, out


def _fit_weights(meta: dict) -> str | None:
    """Refit the fusion weights the way the parent's were fitted."""
    how = str(meta.get("weights_how", ""))
    return "logloss" if "logloss" in how else "auc" if "auc" in how else None


def pooled_index(index: DatasetIndex) -> DatasetIndex:
    """``index`` with its training images counted as validation (for recalibration only)."""
    samples = [replace(s, split="val") if s.split == "train" else s for s in index.samples]
    return DatasetIndex(index.root, samples, f"{index.source}; train + val pooled as "
                        "validation to recalibrate", index.skipped)


def _recalibrate(parent: ModelFolder, index: DatasetIndex, out: Path, new_id: str,
                 record: dict, fit_weights: str | None, policy: str, plan: FitPlan
                 ) -> dict | None:
    """Copy the parent's member files, refit calibration and thresholds (and the gate, where
    the plan says so) on ONNX; evaluate against the parent where there is a test split."""
    from bonefrac.training.fit import refit_on_validation

    out.mkdir(parents=True, exist_ok=True)
    meta = copy.deepcopy(parent.meta)
    for spec in meta["members"]:
        for key in ("onnx", "weights", "history"):
            if spec.get(key):  # a sibling folder's file (weights stored once) is copied in
                name = Path(spec[key]).name
                shutil.copy2(parent.root / spec[key], out / name)
                spec[key] = name
    gate = meta.get("domain_gate")
    for k in ("domain_gate", "domain_gate_skipped", "validation", "fitted_on"):
        meta.pop(k, None)  # refitted below: nothing of the parent's fit may linger
    if plan.gate == "parent":  # same weights, same features: the parent's gate still holds
        shutil.copy2(parent.root / gate["file"], out / GATE_FILE)
        meta["domain_gate"] = {**gate, "file": GATE_FILE,
                               "kept_from_parent": record["parent"]["model_id"]}
    elif plan.gate == "none":
        meta["domain_gate_skipped"] = "too few site images to fit one, and the parent has none"
    meta.update(model_id=new_id, **record)
    write_meta(out, meta)
    cal = pooled_index(index) if plan.calibration == "train+val" else index
    refit_on_validation(out, cal, fit_weights=fit_weights, policy=policy, backend="onnx")
    if plan.gate == "refit":
        fit_folder_gate(out, index, backend="onnx")
    if not plan.evaluate:
        return None
    return evaluate_model(out, index, split="test", compare_with=parent.root)


def _fine_tune(parent: ModelFolder, index: DatasetIndex, out: Path, new_id: str, record: dict,
               fit_weights: str | None, policy: str, cfg: AdaptConfig, device: str) -> dict:
    """Fine-tune each member from the parent's weights, then build the ensemble (which
    skips the test evaluation when the site has no test split)."""
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
                     size=prep["size"], resize=prep["resize"], seed=cfg.seed,
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

    from safetensors.torch import load_file

    from bonefrac.models.weights import save_tensors

    old = load_file(str(parent.member_file(spec, "weights")))
    new = load_file(str(run / "model.safetensors"))
    new.update({k: v for k, v in old.items() if k.startswith(LOC_PREFIX)})
    save_tensors(new, run / "model.safetensors")
    mj = read_run_meta(run)
    mj.update(loc_head=True, heatmap=spec["config"].get("heatmap", "fracture_map"),
              loc_note="fracture-map head copied from the parent (the site has no boxes.csv)")
    write_run_meta(run, mj)
