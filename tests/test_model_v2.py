"""The shipped models: v1 (224 px) still predicts exactly as it did before v2; v2 is the default."""

from __future__ import annotations

import json

import pytest
from helpers import SHIPPED_ENSEMBLE, TEST_DATA, real_images

from bonefrac.inference import Ensemble
from bonefrac.inference.predict import predict_files


def test_v1_predictions_are_unchanged():
    """Probabilities and decisions on the 28 test radiographs equal those written by the code
    before v2 (tests/data/v1_expected_predictions.json, commit ac00fd4)."""
    expected = json.loads((TEST_DATA / "v1_expected_predictions.json").read_text())
    res = predict_files(Ensemble.load(SHIPPED_ENSEMBLE), real_images(), progress=False)
    got = {r["file"].split("tests/data/")[-1]: r for r in res.rows}
    assert set(got) == set(expected)
    for name, want in expected.items():
        for key, value in want.items():
            if key.startswith("prob_"):
                assert got[name][key] == pytest.approx(value, abs=2e-6), (name, key)
            else:
                assert got[name][key] == value, (name, key)
