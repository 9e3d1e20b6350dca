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
from bonefrac.data.boxes import dataset_boxes
from bonefrac.data.dataset import DatasetIndex
from bonefrac.data.preprocess import Preprocessing
from bonefrac.evaluation.calibration import calibrated_prob
from bonefrac.evaluation.detection import choose_box_threshold
from bonefrac.evaluation.domain_fit import fit_folder_gate
from bonefrac.evaluation.evaluate import collect, evaluate_model, split_detections
from bonefrac.evaluation.fitting import fit_on_validation
from bonefrac.evaluation.thresholds import DEFAULT_POLICY, choose_threshold
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.model_folder import ModelFileError, ModelFolder, write_meta
from bonefrac.inference.operating_points import OperatingPoints
from bonefrac.inference.spec import MemberSpec, ModelSpec, read_run_meta, write_run_meta
from bonefrac.utils import sha256_file


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
    mj = read_run_meta(run)
    mj.update({
        "weights_sha256": sha256_file(run / mj["weights_file"]),
        "temperature": fit["temperatures"][name], "threshold": fit["threshold"],
        "threshold_policy": policy, "threshold_how": fit["threshold_how"],
        "operating_points": fit["operating_points"], "validation": fit["validation"],
        "fitted_on": _fitted_on(index, len(val.y)), "disclaimer": DISCLAIMER})
    write_run_meta(run, mj)
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
    spec = ModelFolder.open(out).spec
    val = collect(ens, index.split("val"), desc="validation")
    fit = fit_on_validation(val.y, val.logits, fit_weights=fit_weights, policy=policy)
    for m in spec.members:
        # the member's own threshold, on its probabilities as calibrated inside the ensemble
        m.temperature = fit["temperatures"][m.name]
        m.fusion_weight = fit["weights"][m.name]
        m.threshold, m.threshold_how = choose_threshold(
            val.y, calibrated_prob(val.logits[m.name], m.temperature), policy)
    spec.points = OperatingPoints.from_meta(fit["threshold"], fit["operating_points"])
    spec.weights_how, spec.threshold_policy = fit["weights_how"], policy
    spec.threshold_how, spec.validation = fit["threshold_how"], fit["validation"]
    spec.fitted_on = _fitted_on(index, len(val.y))
    if ens.detector is not None:
        _, dets, gts = split_detections(ens, index.split("val"), dataset_boxes(index.root) or {})
        spec.box_threshold, spec.box_threshold_how = choose_box_threshold(dets, gts)
    spec.write(out)
    return spec.to_dict()


def member_as_run(folder: str | Path, name: str, out: str | Path) -> Path:
    """Member ``name`` of the model folder ``folder`` as a training-run folder ``out``
    (``model.safetensors`` + ``model.json``, its sha256 checked), so that :func:`fit_ensemble`
    can take a shipped member unchanged into a new model (v3 keeps v2's EfficientNet-Lite0)."""
    src = ModelFolder.open(folder)
    m = src.spec.member(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.member_file(m, "weights"), out / "model.safetensors")
    if m.history and (src.root / m.history).is_file():
        shutil.copy2(src.root / m.history, out / "history.json")
    write_run_meta(out, {**m.config, "arch": m.arch, "preprocessing": m.preprocessing.to_dict(),
                         "weights_file": "model.safetensors", "classes": list(CLASSES),
                         "positive_class": 1, "source": f"{src.root.name}/{m.name}"})
    return out


def share_member_files(folder: str | Path, name: str, source: str | Path) -> None:
    """Make member ``name`` of model folder ``folder`` use the files of the same member in the
    sibling model folder ``source`` (weights stored once). Its weights must be byte-identical
    to the source member's; then its weights, ONNX export (a function of the weights) and
    history become relative references to the source's files and the copies here are deleted.
    """
    folder, source = Path(folder), Path(source)
    spec, src = ModelFolder.open(folder).spec, ModelFolder.open(source).spec.member(name)
    m = spec.member(name)
    if m.weights_sha256 != src.weights_sha256:
        raise ModelFileError(f"{folder}: member {name}'s weights differ from {source}'s")
    for key in ("weights", "onnx", "history"):
        if getattr(m, key) and getattr(src, key):
            (folder / getattr(m, key)).unlink(missing_ok=True)
            setattr(m, key, f"../{source.name}/{getattr(src, key)}")
    m.onnx_sha256 = src.onnx_sha256
    spec.write(folder)


def _copy_member(run: Path, out: Path, taken: set[str], n_runs: int) -> MemberSpec:
    """Copy a trained run's weights (and history) into ``out`` as an uncalibrated member."""
    mj = read_run_meta(run)
    name = mj["arch"] if mj["arch"] not in taken else f"{mj['arch']}_{len(taken)}"
    shutil.copy2(run / mj["weights_file"], out / f"{name}.safetensors")
    if (run / "history.json").is_file():
        shutil.copy2(run / "history.json", out / f"{name}_history.json")
    config = {k: mj[k] for k in ("arch", "hidden", "dropout", "backbone_weights", "loc_head",
                                 "heatmap", "detector") if k in mj}
    return MemberSpec(
        name=name, arch=mj["arch"], source_run=str(run),
        preprocessing=Preprocessing.from_dict(mj["preprocessing"]),
        temperature=1.0, fusion_weight=1.0 / n_runs, weights=f"{name}.safetensors",
        weights_sha256=sha256_file(out / f"{name}.safetensors"),
        config={**config, **_warm_start(run)}, history=f"{name}_history.json",
        detector=mj.get("detector"))


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
    members: list[MemberSpec] = []
    for run in map(Path, runs):
        members.append(_copy_member(run, out, {m.name for m in members}, len(runs)))
    spec = ModelSpec(
        model_id=model_id or f"bonefrac-{'+'.join(m.name for m in members)}",
        members=members, points=OperatingPoints(0.5), version=__version__,
        classes=list(CLASSES), positive_class=1, disclaimer=DISCLAIMER,
        baseline_member=members[0].name,
        fusion="P = sum_i w_i * sigmoid((z_i1 - z_i0) / T_i), sum_i w_i = 1")
    write_meta(out, {**spec.to_dict(), **(extra_meta or {})})
    refit_on_validation(out, index, fit_weights=fit_weights, policy=policy, backend="torch")
    if export_onnx:
        from bonefrac.export.onnx import export_model

        export_model(out, out)
    fit_folder_gate(out, index, backend="onnx" if export_onnx else "torch")
    return evaluate_model(out, index, split="test", compare_with=compare_with)
