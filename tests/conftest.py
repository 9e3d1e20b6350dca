"""Shared fixtures. Everything is built from the real radiographs committed in tests/data/
(28 images from the canonical split, CC BY 4.0, see tests/data/ATTRIBUTION.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Re-exported for the test modules that still import them from here; new code imports helpers.
from helpers import (  # noqa: F401
    EXAMPLES,
    ROOT,
    SHARED_DATA,
    SHIPPED_BASELINE,
    SHIPPED_ENSEMBLE,
    TEST_DATA,
    TINY_SIZE,
    real_images,
)

# Tests that need these fixtures wait for two real training runs (~40 s on 2 cores): slow.
SLOW_FIXTURES = frozenset({"tiny_runs", "tiny_ensemble"})
# Slow tests in modules that mark nothing themselves yet (each trains or evaluates a real run,
# 4-40 s; timed with --durations). Elsewhere tests carry @pytest.mark.slow in their own file.
SLOW_TESTS = {
    "test_training.py": {
        "test_resume_after_interruption_matches_uninterrupted",
        "test_soup_averages_runs_that_each_start_from_stage_1",
        "test_ema_run_validates_the_average_and_logs_the_raw_weights",
        "test_late_views_skip_pooled_features_and_one_cycle_decays",
        "test_box_supervision_is_off_without_boxes_or_with_weight_zero",
    },
    "test_localisation.py": {
        "test_evaluate_writes_localisation",
        "test_without_boxes_no_localisation",
    },
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that uses a trained fixture, directly or through another one,
    and those listed in ``SLOW_TESTS``, so `make test-fast` never starts a training run."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        if (SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))
                or name in SLOW_TESTS.get(item.path.name, ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Converted weights and decoded-image caches go to a per-session folder."""
    os.environ["BONEFRAC_CACHE"] = str(tmp_path_factory.mktemp("bonefrac_cache"))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Two members really trained (1+1 epochs, 96 px) on tests/data, finalized on its val split."""
    from bonefrac.training import TrainConfig, train

    out = {}
    for arch in ("mobilenetv2", "efficientnet_lite0"):
        run = tmp_path_factory.mktemp(f"run_{arch}")
        cfg = TrainConfig(arch=arch, epochs_frozen=1, epochs_finetune=1, views=2,
                          size=TINY_SIZE, batch_size=16)
        out[arch] = train(TEST_DATA, run, cfg)
    return out


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_runs, tmp_path_factory) -> Path:
    """An ensemble folder (safetensors + ONNX + meta + Results) fitted from ``tiny_runs``."""
    from bonefrac.data.dataset import load_index
    from bonefrac.training.fit import fit_ensemble

    out = tmp_path_factory.mktemp("ensemble")
    fit_ensemble([tiny_runs["mobilenetv2"], tiny_runs["efficientnet_lite0"]],
                 load_index(TEST_DATA), out)
    return out
