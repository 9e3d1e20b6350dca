"""Does P depend on how a radiograph's pixels were stored? Prints JSON.

    python evaluations/dicom_intensity.py --data ../shared/data/bone-fracture --n 10

Each of the first ``n`` images of the canonical test split (sorted by path; or of ``--images``,
a folder of JPEGs) is decoded once to 8-bit grayscale ``g`` and stored six ways: an 8-bit PNG
(the reference), 12-bit MONOCHROME2 without a window, at full scale (``g * 4095 / 255``) and
with a detector pedestal (``400 + 12 g``, values 400..3460), the full-scale 12-bit values declared
BitsStored 16 (common), 12-bit MONOCHROME1 without a
window (``4095 - g * 4095 / 255``), and 16-bit MONOCHROME2 (``g * 257``) with a VOI window
over its range. ``max_abs_dp`` is, per storage, the largest |P - P(PNG)| over the images with
the shipped default model (``bonefrac.load("ensemble")``).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from bonefrac.testing import dicom as testing_dicom

ROOT = Path(__file__).resolve().parent.parent


def storages(g: np.ndarray, folder: Path, write_dicom: Callable | None = None
             ) -> dict[str, Path]:
    """The 8-bit grayscale radiograph ``g`` ``(H, W)`` stored six ways in ``folder``."""
    write_dicom = write_dicom or testing_dicom.write_dicom
    folder.mkdir(parents=True, exist_ok=True)
    full = np.round(g.astype(np.float64) * (4095 / 255)).astype(np.uint16)
    png = folder / "png8.png"
    Image.fromarray(g).save(png)
    return {
        "png8": png,
        "mono2_12bit": write_dicom(folder / "mono2_12.dcm", full, bits_stored=12),
        "mono2_12bit_pedestal": write_dicom(folder / "mono2_12p.dcm",
                                            (400 + 12 * g.astype(np.uint16)), bits_stored=12),
        "mono2_12bit_declared_16": write_dicom(folder / "mono2_12in16.dcm", full),
        "mono1_12bit": write_dicom(folder / "mono1_12.dcm", 4095 - full,
                                   photometric="MONOCHROME1", bits_stored=12),
        "mono2_16bit_window": write_dicom(folder / "mono2_16w.dcm", g.astype(np.uint16) * 257,
                                          WindowCenter=32767.5, WindowWidth=65536),
    }


def test_split_images(data: Path, n: int) -> list[Path]:
    """The first ``n`` canonical test-split images of ``data`` (sorted by path)."""
    with open(data / "manifest.csv", newline="") as f:
        rows = [r["path"] for r in csv.DictReader(f) if r["orig_split"] == "test"]
    return [data / p for p in sorted(rows)[:n]]


def measure(images: list[Path], model: str = "ensemble", write_dicom: Callable | None = None
            ) -> dict:
    """P per image and storage, and the largest |dP| from the PNG per storage."""
    import bonefrac

    m = bonefrac.load(model)
    probs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(images):
            with Image.open(src) as im:
                g = np.asarray(im.convert("L"))
            files = storages(g, Path(tmp) / str(i), write_dicom)
            for name, res in zip(files, m.predict(list(files.values())), strict=True):
                probs.setdefault(name, []).append(round(float(res.prob_fractured), 4))
    ref = np.array(probs["png8"])
    return {"model": m.model_id, "n": len(images), "probs": probs,
            "max_abs_dp": {k: round(float(np.abs(np.array(v) - ref).max()), 4)
                           for k, v in probs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/bone-fracture")
    ap.add_argument("--images", type=Path, help="a folder of JPEGs instead of --data")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--model", default="ensemble")
    a = ap.parse_args()
    images = (sorted(a.images.rglob("*.jpg"))[:a.n] if a.images
              else test_split_images(a.data, a.n))
    print(json.dumps(measure(images, a.model), indent=1))


if __name__ == "__main__":
    main()
