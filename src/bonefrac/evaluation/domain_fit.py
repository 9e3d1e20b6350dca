"""Fit the input-domain gate (:class:`bonefrac.inference.domain.DomainGate`) of a model.

Features: every member's pooled backbone features of the TRAINING split. Per member a PCA
(``n_components`` axes, fitted on training) shrinks them; the concatenated scores get a
Ledoit-Wolf shrunk covariance. The two limits (distance and out-of-components residual, each
giving ``domain_score`` = 1) are the ``percentile``-th percentiles of the VALIDATION split's
values, so about 1% of in-distribution images are flagged by design. Test data is never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bonefrac import InputError
from bonefrac.data.dataset import Sample
from bonefrac.evaluation.evaluate import decode_inputs
from bonefrac.inference.domain import GATE_FILE, DomainGate
from bonefrac.inference.ensemble import Ensemble
from bonefrac.utils import sha256_file

# Principal axes per member. Measured, distance alone (no residual, no cheap checks), share of
# the benchmark's non-radiographs flagged, v2 / v1 ensemble: 32 axes 72% / 9%, 64: 84% / 33%,
# 128: 91% / 79%, 256: 93% / 86%, always 1.1% of validation (limit at its 99th percentile).
# With the residual limit as well, 256 axes: 93% / 93% (all but the colour photos, which the
# colour check flags). (evaluations/domain_gate.py; looked at validation and those images only.)
N_COMPONENTS = 256
PERCENTILE = 99.5  # per limit; the two together flag 1.1% of validation (shipped models)


def collect_pooled(ens: Ensemble, samples: Sequence[Sample], desc: str, batch: int = 32
                   ) -> dict[str, np.ndarray]:
    """``{member: (N, C)}`` pooled features of the readable ``samples`` (decoded through the
    shared decode cache, unreadable files skipped as in evaluation)."""
    gray, kept, _, _ = decode_inputs(ens, samples, desc)
    n = len(kept)
    out: dict[str, list[np.ndarray]] = {m.name: [] for m in ens.members}
    for i in tqdm(range(0, n, batch), desc=f"{desc}: features", unit="batch"):
        res = ens.member_outputs({s: g[i:i + batch] for s, g in gray.items()}, want_pooled=True)
        for name, (_, _, pooled) in res.items():
            if pooled is None:
                raise InputError(f"member {name} has no pooled-feature output: re-export the "
                                 "model with `bonefrac export` first")
            out[name].append(pooled)
    return {k: np.concatenate(v) for k, v in out.items()}


def fit_gate(train: dict[str, np.ndarray], val: dict[str, np.ndarray], *,
             n_components: int = N_COMPONENTS, percentile: float = PERCENTILE,
             info: dict[str, str] | None = None) -> DomainGate:
    """A gate from ``{member: (N, C)}`` training and validation features."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    members = tuple(train)
    n_train = len(next(iter(train.values())))
    mean, comps = {}, {}
    for m in members:
        k = max(1, min(n_components, n_train - 1, train[m].shape[1]))
        pca = PCA(k, svd_solver="full", random_state=0).fit(np.asarray(train[m], np.float64))
        mean[m], comps[m] = pca.mean_, pca.components_.astype(np.float32)  # half the file
    probe = DomainGate(members, mean, comps, np.zeros(1), np.eye(1), 1.0, 1.0, {})
    lw = LedoitWolf().fit(probe.project(train))
    unit = DomainGate(members, mean, comps, lw.location_, lw.precision_, 1.0, 1.0, {})
    d_val, r_val = unit.measures(val)
    limits = float(np.percentile(d_val, percentile)), float(np.percentile(r_val, percentile))
    gate = DomainGate(members, mean, comps, lw.location_, lw.precision_, *limits, {})
    info = {**(info or {}), "n_train": str(n_train), "n_val": str(len(d_val)),
            "n_components": str(n_components), "percentile": str(percentile),
            "shrinkage": f"{lw.shrinkage_:.4f}",
            "val_flagged": f"{float(np.mean(gate.score(val) > 1)):.4f}",
            "train_flagged": f"{float(np.mean(gate.score(train) > 1)):.4f}"}
    return DomainGate(members, mean, comps, lw.location_, lw.precision_, *limits, info)


def fit_model_gate(ens: Ensemble, train: Sequence[Sample], val: Sequence[Sample], out: Path,
                   features: tuple[dict, dict] | None = None, **kwargs) -> dict:
    """Fit ``ens``'s gate on ``train``/``val``, write ``out/domain_gate.npz`` and return the
    ``domain_gate`` entry of ``ensemble_meta.json`` (file, sha256, threshold, how).
    ``features``: the (train, val) :func:`collect_pooled` outputs, if already computed."""
    if not train or not val:
        raise InputError("the domain gate needs training and validation images")
    feats = features or (collect_pooled(ens, train, "gate: training split"),
                         collect_pooled(ens, val, "gate: validation split"))
    gate = fit_gate(*feats, **kwargs)
    gate.save(out / GATE_FILE)
    return {"file": GATE_FILE, "sha256": sha256_file(out / GATE_FILE),
            "distance_threshold": gate.threshold, "residual_threshold": gate.residual_threshold,
            "how": (f"Mahalanobis distance of the members' pooled features (PCA "
                    f"{gate.info['n_components']} per member, Ledoit-Wolf shrinkage "
                    f"{gate.info['shrinkage']}) from the training split ({gate.info['n_train']} "
                    f"images) and their residual outside those components; each limit = "
                    f"{gate.info['percentile']}th percentile on validation "
                    f"({gate.info['n_val']} images)"),
            **{k: gate.info[k] for k in ("n_train", "n_val", "val_flagged", "train_flagged")}}


MIN_TRAIN = 100  # fewer training images than this give no usable covariance: no gate


def fit_folder_gate(model_dir: str | Path, index, *, backend: str = "auto",
                    features: tuple[dict, dict] | None = None, **kwargs) -> dict:
    """Fit the gate of the ensemble folder ``model_dir`` on ``index``'s train/val splits and
    record it in its ``ensemble_meta.json`` (key ``domain_gate``; the file's sha256 beside it).

    Returns the entry, or ``{"skipped": why}`` (also recorded, so prediction can say why the
    learned check is off) when the training split has fewer than :data:`MIN_TRAIN` images.
    Raises ValueError for a run folder (export it first: it has no ensemble meta).
    """
    from bonefrac.inference.model_folder import ModelFolder, write_meta

    folder = ModelFolder.open(model_dir)
    if folder.is_run:
        raise InputError(f"{model_dir}: a training run; export it first (`bonefrac export "
                         f"--model {model_dir} --out DIR`) and fit the gate of DIR")
    train, val = index.split("train"), index.split("val")
    meta = folder.meta
    meta.pop("domain_gate_skipped", None)
    meta.pop("domain_gate", None)  # the old gate goes first: a stale or broken one must not
    write_meta(folder.root, meta)  # stop the model loading for its refit
    if len(train) < MIN_TRAIN:
        meta["domain_gate_skipped"] = (f"training split of {index.root} has {len(train)} "
                                       f"images (< {MIN_TRAIN}): too few for a domain gate")
        write_meta(folder.root, meta)
        return {"skipped": meta["domain_gate_skipped"]}
    ens = Ensemble.load(folder.root, backend=backend)
    entry = fit_model_gate(ens, train, val, folder.root, features, **kwargs)
    entry["fitted_on"] = {"data": str(index.root), "data_fingerprint": index.fingerprint()}
    meta["domain_gate"] = entry
    write_meta(folder.root, meta)
    return entry
