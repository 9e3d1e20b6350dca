"""After training: fit calibration, fusion and operating points on VALIDATION, then evaluate.

``finalize_run`` does it for one trained run (an ensemble of one); ``fit_ensemble`` builds an
ensemble folder from several runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bonefrac import CLASSES, DISCLAIMER, __version__
from bonefrac.data.dataset import DatasetIndex
from bonefrac.evaluation.calibration import calibrated_prob
from bonefrac.evaluation.domain_fit import fit_folder_gate
from bonefrac.evaluation.evaluate import collect, evaluate_model
from bonefrac.evaluation.fitting import fit_on_validation
from bonefrac.evaluation.thresholds import DEFAULT_POLICY, choose_threshold
from bonefrac.inference.ensemble import META_NAME, Ensemble
from bonefrac.inference.model_folder import ModelFolder
from bonefrac.utils import sha256_file, write_json


def _fitted_on(index: DatasetIndex, n_val: int) -> dict:
    """What a fit used, and when (UTC date: a checkout's file times are the clone's)."""
    return {"data": str(index.root), "data_fingerprint": index.fingerprint(),
            "split_source": index.source, "val_n": n_val,
            "splits": {sp: len(index.split(sp)) for sp in ("train", "val", "test")},
            "date": datetime.now(UTC).date().isoformat()}


def _warm_start(run: Path) -> dict:
    """``{"init_from": NAME}``: the model folder a run was warm-started from (its name only:
    the path is the training machine's), or {}."""
    cfg = run / "config.json"
    src = json.loads(cfg.read_text()).get("init_from") if cfg.is_file() else None
    return {"init_from": Path(src).name} if src else {}


def finalize_run(run: str | Path, index: DatasetIndex, policy: str = DEFAULT_POLICY,
                 evaluate: bool = True) -> dict:
    """Temperature, threshold and operating points of a trained run, fitted on validation;
    stored in ``model.json``; then the test-split ``Results/``."""
    run = Path(run)
    ens = Ensemble.load(run, backend="torch", verify=False)
    val = collect(ens, index.split("val"), desc="validation")
    fit = fit_on_validation(val.y, val.logits, policy=policy)
    name = ens.members[0].name
    mj = json.loads((run / "model.json").read_text())
    mj.update({
        "weights_sha256": sha256_file(run / mj["weights_file"]),
        "temperature": fit["temperatures"][name], "threshold": fit["threshold"],
        "threshold_policy": policy, "threshold_how": fit["threshold_how"],
        "operating_points": fit["operating_points"], "validation": fit["validation"],
        "fitted_on": _fitted_on(index, len(val.y)), "disclaimer": DISCLAIMER})
    write_json(run / "model.json", mj)
    if not evaluate or not index.split("test"):  # a data set may hold no test split
        return mj
    return evaluate_model(run, index, split="test", backend="torch")


def refit_on_validation(out: str | Path, index: DatasetIndex, *, fit_weights: str | None = None,
                        policy: str = DEFAULT_POLICY, backend: str = "auto") -> dict:
    """Fit temperatures, fusion weights, thresholds and operating points of the ensemble folder
    ``out`` on ``index``'s VALIDATION split and write them into its ``ensemble_meta.json``
    (weights untouched; ``backend="onnx"`` needs no torch). Returns the new meta."""
    out = Path(out)
    ens = Ensemble.load(out, backend=backend)
    meta = ModelFolder.open(out).meta
    val = collect(ens, index.split("val"), desc="validation")
    fit = fit_on_validation(val.y, val.logits, fit_weights=fit_weights, policy=policy)
    for m in meta["members"]:
        # the member's own threshold, on its probabilities as calibrated inside the ensemble
        t = fit["temperatures"][m["name"]]
        alone, how = choose_threshold(val.y, calibrated_prob(val.logits[m["name"]], t), policy)
        m.update(temperature=t, fusion_weight=fit["weights"][m["name"]], threshold=alone,
                 threshold_how=how)
    meta.update({
        "weights_how": fit["weights_how"], "threshold": fit["threshold"],
        "threshold_policy": policy, "threshold_how": fit["threshold_how"],
        "operating_points": fit["operating_points"], "validation": fit["validation"],
        "fitted_on": _fitted_on(index, len(val.y))})
    write_json(out / META_NAME, meta)
    return meta


def fit_ensemble(runs: Sequence[str | Path], index: DatasetIndex, out: str | Path, *,
                 fit_weights: str | None = None, policy: str = DEFAULT_POLICY,
                 model_id: str | None = None, export_onnx: bool = True,
                 extra_meta: dict | None = None, compare_with: str | Path | None = None
                 ) -> dict:
    """Build ``out`` from trained ``runs``: copy members, fit on validation, export, fit the
    input-domain gate (training features, validation threshold), evaluate on test.

    The first run is the baseline the comparison table measures the ensemble against.
    ``extra_meta`` goes into ``ensemble_meta.json`` (e.g. ``bonefrac adapt``'s parent);
    ``compare_with``: a model evaluated beside it on the same test images (``comparison.md``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for run in map(Path, runs):
        mj = json.loads((run / "model.json").read_text())
        name = mj["arch"]
        if any(m["name"] == name for m in members):
            name = f"{name}_{len(members)}"
        shutil.copy2(run / mj["weights_file"], out / f"{name}.safetensors")
        if (run / "history.json").is_file():
            shutil.copy2(run / "history.json", out / f"{name}_history.json")
        members.append({
            "name": name, "arch": mj["arch"], "source_run": str(run),
            "weights": f"{name}.safetensors",
            "weights_sha256": sha256_file(out / f"{name}.safetensors"),
            "config": {**{k: mj[k] for k in ("arch", "hidden", "dropout", "backbone_weights",
                                             "loc_head", "heatmap") if k in mj},
                       **_warm_start(run)},
            "preprocessing": mj["preprocessing"], "history": f"{name}_history.json",
            "temperature": 1.0, "fusion_weight": 1.0 / len(runs)})
    meta = {"format": "bonefrac-ensemble/1",
            "model_id": model_id or f"bonefrac-{'+'.join(m['name'] for m in members)}",
            "version": __version__, "classes": list(CLASSES), "positive_class": 1,
            "disclaimer": DISCLAIMER, "baseline_member": members[0]["name"],
            "fusion": "P = sum_i w_i * sigmoid((z_i1 - z_i0) / T_i), sum_i w_i = 1",
            "threshold": 0.5, "members": members, **(extra_meta or {})}
    write_json(out / META_NAME, meta)
    refit_on_validation(out, index, fit_weights=fit_weights, policy=policy, backend="torch")
    if export_onnx:
        from bonefrac.export.onnx import export_model

        export_model(out, out)
    fit_folder_gate(out, index, backend="onnx" if export_onnx else "torch")
    if not index.split("test"):  # e.g. a site with train/val only: nothing to evaluate on
        return {}
    return evaluate_model(out, index, split="test", compare_with=compare_with)
