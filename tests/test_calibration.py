"""Temperature scaling on real logits, and the guarantee that calibration, fusion weights and
thresholds are fitted on the validation split only."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TEST_DATA
from scipy.optimize import minimize_scalar

import bonefrac.training.fit as fit_mod
from bonefrac.data.dataset import load_index
from bonefrac.evaluation.calibration import calibrated_prob, fit_temperature
from bonefrac.evaluation.evaluate import collect
from bonefrac.evaluation.fitting import fit_on_validation
from bonefrac.evaluation.metrics import log_loss
from bonefrac.inference.ensemble import Ensemble


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    return log_loss(y, calibrated_prob(logits, t))


@pytest.fixture(scope="module")
def index():
    return load_index(TEST_DATA)


@pytest.fixture(scope="module")
def real_logits(tiny_runs, index) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """member -> split -> (labels, raw logits (N, 2)) on the real tests/data images."""
    out = {}
    for arch, run in tiny_runs.items():
        ens = Ensemble.load(run, backend="torch", verify=False)
        out[arch] = {}
        for split in ("train", "val", "test"):
            so = collect(ens, index.split(split), desc=split)
            out[arch][split] = (so.y, so.logits[ens.members[0].name])
    return out


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnet_lite0"])
def test_temperature_minimises_validation_nll(real_logits, arch):
    y, z = real_logits[arch]["val"]
    t = fit_temperature(z, y)
    assert 0.05 <= t <= 20
    assert nll(z, y, t) <= nll(z, y, 1.0) + 1e-12
    # the golden-section optimum matches a generic bounded optimiser on log T
    ref = minimize_scalar(lambda lt: nll(z, y, math.exp(lt)), bounds=(math.log(0.05),
                                                                     math.log(20)),
                          method="bounded", options={"xatol": 1e-10})
    assert nll(z, y, t) <= ref.fun + 1e-9


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnet_lite0"])
def test_overconfident_logits_are_cooled(real_logits, arch):
    """Scaling a real model's logits by s makes it over-confident; the fitted T scales by s
    (NLL depends on z / T only) and the NLL drops back to the original optimum."""
    y, z = real_logits[arch]["val"]
    z = z.astype(np.float64)  # so that z * s is exact up to float64 rounding
    t = fit_temperature(z, y)
    s = min(5.0, 10.0 / t)  # keep s * t inside the search range [0.05, 20]
    t_s = fit_temperature(z * s, y)
    assert t_s == pytest.approx(s * t, rel=1e-6)
    assert nll(z * s, y, t_s) == pytest.approx(nll(z, y, t), abs=1e-10)
    assert nll(z * s, y, t_s) < nll(z * s, y, 1.0)


def test_temperature_never_increases_nll(real_logits):
    """On 200 random subsets of the real logits (both members, all 28 images), the fitted
    temperature never does worse than T = 1."""
    rng = np.random.default_rng(0)
    for arch in real_logits:
        y = np.concatenate([real_logits[arch][s][0] for s in ("train", "val", "test")])
        z = np.concatenate([real_logits[arch][s][1] for s in ("train", "val", "test")])
        for _ in range(100):
            idx = rng.choice(len(y), size=int(rng.integers(4, len(y) + 1)), replace=True)
            t = fit_temperature(z[idx], y[idx])
            assert nll(z[idx], y[idx], t) <= nll(z[idx], y[idx], 1.0) + 1e-12


def test_fit_on_validation_reports_its_own_effect(real_logits):
    y, _ = real_logits["mobilenetv2"]["val"]
    logits = {a: real_logits[a]["val"][1] for a in real_logits}
    fit = fit_on_validation(y, logits)
    for a, z in logits.items():
        m = fit["validation"]["members"][a]
        assert m["before"]["nll"] == pytest.approx(nll(z, y, 1.0))
        assert m["after"]["nll"] == pytest.approx(nll(z, y, fit["temperatures"][a]))
        assert m["after"]["nll"] <= m["before"]["nll"] + 1e-12
    assert fit["validation"]["n"] == len(y)


def _record_collect(monkeypatch) -> list[list]:
    calls: list[list] = []

    def recording_collect(ens, samples, *args, **kwargs):
        calls.append(list(samples))
        return collect(ens, samples, *args, **kwargs)

    monkeypatch.setattr(fit_mod, "collect", recording_collect)
    return calls


def test_fit_ensemble_touches_only_validation(tiny_runs, index, tmp_path, monkeypatch):
    calls = _record_collect(monkeypatch)
    evaluated = []
    monkeypatch.setattr(fit_mod, "evaluate_model",
                        lambda out, idx, split="test", **kw: evaluated.append(split) or {})
    runs = [tiny_runs["mobilenetv2"], tiny_runs["efficientnet_lite0"]]
    out = tmp_path / "ens"
    fit_mod.fit_ensemble(runs, index, out, export_onnx=False)
    val_rel = sorted(s.rel for s in index.split("val"))
    assert calls, "fit_ensemble fitted nothing through collect"
    for samples in calls:
        assert {s.split for s in samples} == {"val"}
        assert sorted(s.rel for s in samples) == val_rel
    assert evaluated == ["test"]  # the test split is only evaluated, after everything is fitted

    # what was stored is exactly a fit on the validation logits
    meta = json.loads((out / "ensemble_meta.json").read_text())
    ens = Ensemble.load(out, backend="torch")
    val = collect(ens, index.split("val"), desc="val")
    ref = fit_on_validation(val.y, val.logits, policy=meta["threshold_policy"])
    assert meta["threshold"] == pytest.approx(ref["threshold"], abs=1e-9)
    for m in meta["members"]:
        assert m["temperature"] == pytest.approx(ref["temperatures"][m["name"]], rel=1e-9)
    assert meta["fitted_on"]["val_n"] == len(val_rel)


def test_finalize_run_touches_only_validation(tiny_runs, index, tmp_path, monkeypatch):
    calls = _record_collect(monkeypatch)
    run = Path(shutil.copytree(tiny_runs["mobilenetv2"], tmp_path / "run"))
    fit_mod.finalize_run(run, index, evaluate=False)
    assert len(calls) == 1 and {s.split for s in calls[0]} == {"val"}
    mj = json.loads((run / "model.json").read_text())
    assert mj["validation"]["n"] == len(index.split("val"))
