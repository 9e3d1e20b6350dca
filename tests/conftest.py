"""Shared fixtures. Everything is built from the real radiographs committed in tests/data/
(28 images from the canonical split, CC BY 4.0, see tests/data/ATTRIBUTION.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / "tests" / "data"
EXAMPLES = ROOT / "examples" / "test_images"
SHIPPED_ENSEMBLE = ROOT / "src" / "bonefrac" / "pretrained" / "ensemble_bone-fracture_v1"
SHIPPED_BASELINE = ROOT / "src" / "bonefrac" / "pretrained" / "mobilenetv2_bone-fracture_v1"
SHARED_DATA = ROOT.parent / "shared" / "data" / "bone-fracture"
TINY_SIZE = 96  # small inputs keep the real training runs in tests to seconds


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Converted weights and decoded-image caches go to a per-session folder."""
    os.environ["BONEFRAC_CACHE"] = str(tmp_path_factory.mktemp("bonefrac_cache"))


def real_images(n: int | None = None) -> list[Path]:
    files = sorted(p for p in TEST_DATA.rglob("*.jpg"))
    return files[:n] if n else files


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
