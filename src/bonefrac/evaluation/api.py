"""``bonefrac.evaluate(model, data, split="test")``: the CLI's ``bonefrac evaluate`` for Python.

Needs the [eval] extra (scikit-learn, matplotlib) for the plots and the classification
report; it is checked before any image is decoded.
"""

from __future__ import annotations

import importlib.util
import os

from bonefrac import InputError
from bonefrac.data.dataset import load_index
from bonefrac.evaluation.evaluate import evaluate_model
from bonefrac.inference.api import Model
from bonefrac.inference.ensemble import Ensemble

EVAL_MODULES = ("sklearn", "matplotlib")


def evaluate(model: Model | Ensemble | str | os.PathLike | None, data: str | os.PathLike,
             split: str = "test", *, out: str | os.PathLike | None = None,
             refit_threshold: bool = False, subgroup: str | None = None, seed: int = 0,
             backend: str = "auto") -> dict:
    """Evaluate ``model`` on the labelled folder ``data`` and write its ``Results/``.

    Args:
        model: a :class:`bonefrac.Model` (from :func:`bonefrac.load`), an ``Ensemble``, a short
            name (``"ensemble"``, ``"baseline"``) or a model folder.
        data: a folder with ``fractured/`` and ``non_fractured/`` (and optional
            ``manifest.csv`` / ``groups.csv``), as ``bonefrac evaluate --data``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (external validation: every
            image is test).
        out: the Results folder (default: ``MODEL/Results``).
        refit_threshold: as ``bonefrac evaluate --refit-threshold``.
        subgroup: as ``bonefrac evaluate --subgroup``.
        backend: as ``bonefrac evaluate --backend``.
        seed: the split seed for folders without a manifest.
    Returns:
        The metrics dict ``bonefrac evaluate`` writes to ``metrics.json``.
    Raises:
        ImportError: scikit-learn or matplotlib missing (with the pip line).
    """
    missing = [m for m in EVAL_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"bonefrac.evaluate needs the [eval] extra ({', '.join(missing)} not "
                          "installed): pip install -e '.[eval]'")
    if split not in ("train", "val", "test", "all"):
        raise InputError(f"split must be train, val, test or all, not {split!r}")
    folder = model.root if isinstance(model, Model | Ensemble) else model
    if isinstance(folder, str) or folder is None:
        from bonefrac.inference.model_folder import resolve_model

        folder = resolve_model(folder)
    index = load_index(data, seed=seed, all_test=split == "all")
    return evaluate_model(folder, index, split="test" if split == "all" else split, out=out,
                          refit_threshold=refit_threshold, subgroup=subgroup, backend=backend)
