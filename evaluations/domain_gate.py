"""Input-domain gate benchmark: how often the gate flags real radiographs and non-radiographs.

    python evaluations/domain_gate.py --data ../shared/data/bone-fracture [--model ensemble ...]

For each model: the share of the canonical validation and test splits that the gate flags
(any warning -> decision "uncertain"; aim <= 2%), and the share of a folder of non-radiographs
built from material that ships with packages (:func:`build_non_radiographs`; aim >= 95%),
counting refused files (errors) as not answered. Prints JSON (also ``--out FILE``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = sorted((ROOT / "examples" / "test_images").glob("*.jpg"))
# scikit-image's bundled pictures (no download): natural photos, microscopy, text, a phantom.
SKIMAGE = ("astronaut", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins",
           "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
           "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
           "rocket", "shepp_logan_phantom", "text", "cell")
# pydicom's bundled single-frame CT, MR, US and NM objects.
PYDICOM = ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm",
           "examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm",
           "JPEG2000.dcm")


def _save(arr: np.ndarray, path: Path) -> None:
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a / max(float(a.max()), 1e-9) * 255, 0, 255).astype(np.uint8)
    Image.fromarray(a[..., :3] if a.ndim == 3 else a).save(path)


def text_page(size: tuple[int, int] = (850, 1100)) -> Image.Image:
    """A rendered page of black text on white (Pillow's built-in font)."""
    im = Image.new("L", size, 255)
    d = ImageDraw.Draw(im)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "report"]
    rng = np.random.default_rng(0)
    for y in range(40, size[1] - 40, 22):
        d.text((50, y), " ".join(rng.choice(words, 9)), fill=0)
    return im


def colour_photo(radiograph: Path) -> Image.Image:
    """A colour 'photo' of a radiograph: warm tint and a vignette, as a phone picture of a
    light box looks."""
    g = ImageOps.grayscale(Image.open(radiograph))
    return ImageOps.colorize(g, black=(20, 30, 70), white=(255, 230, 170))


def build_non_radiographs(out: Path) -> list[Path]:
    """Write the non-radiograph folder; returns its files (skipping what a package lacks)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    try:
        from skimage import data
    except ImportError:
        data = None
    for name in SKIMAGE if data else ():
        try:
            arr = getattr(data, name)()
        except Exception:  # some need a download: not material that ships
            continue
        files.append(out / f"skimage_{name}.png")
        _save(arr, files[-1])
    try:
        import pydicom

        src = Path(pydicom.__file__).parent / "data" / "test_files"
        for name in PYDICOM:
            if (src / name).is_file():
                files.append(out / name)
                files[-1].write_bytes((src / name).read_bytes())
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    for i in range(4):
        files.append(out / f"noise_grey_{i}.png")
        _save(rng.integers(0, 256, (384, 384), dtype=np.uint8), files[-1])
        files.append(out / f"noise_colour_{i}.png")
        _save(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8), files[-1])
    files.append(out / "text_page.png")
    text_page().save(files[-1])
    for i, f in enumerate(EXAMPLE[:3]):
        files.append(out / f"colour_photo_{i}.jpg")
        colour_photo(f).save(files[-1], quality=90)
    return files


def flagged_share(model, files: list[Path]) -> dict:
    """Run ``bonefrac predict``'s pipeline; flagged = decision uncertain, or refused."""
    from bonefrac.inference.predict import predict_files

    res = predict_files(model, files, progress=False)
    flagged = [r for r in res.rows if r["decision"] == "uncertain"]
    missed = [r["file"] for r in res.rows if r["decision"] != "uncertain"]
    return {"n": len(files), "predicted": len(res.rows), "refused": len(res.errors),
            "flagged": len(flagged), "flagged_or_refused_share":
                (len(flagged) + len(res.errors)) / max(1, len(files)),
            "flagged_without_reason": sum(not r["warning"] for r in flagged),
            "not_flagged": [Path(f).name for f in missed][:20],
            "reasons": sorted({r["warning"].split(" (")[0] for r in flagged})[:30]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the bone-fracture data set (canonical split)")
    ap.add_argument("--model", nargs="+", default=["ensemble", "ensemble-224"])
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    from bonefrac.data.dataset import load_index
    from bonefrac.inference.ensemble import Ensemble

    index = load_index(args.data)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        ood = build_non_radiographs(Path(tmp) / "non_radiographs")
        for name in args.model:
            ens = Ensemble.load(name, backend="onnx", threads=1)
            r = {"model_id": ens.model_id, "gate": ens.gate_note or "on"}
            for split in ("val", "test"):
                files = [s.path for s in index.split(split)]
                r[split] = flagged_share(ens, files)
                r[split].pop("not_flagged")
            r["non_radiographs"] = flagged_share(ens, ood)
            r["meets"] = {"val_le_2pct": r["val"]["flagged_or_refused_share"] <= 0.02,
                          "test_le_2pct": r["test"]["flagged_or_refused_share"] <= 0.02,
                          "non_radiographs_ge_95pct":
                              r["non_radiographs"]["flagged_or_refused_share"] >= 0.95}
            report[name] = r
            print(f"{name}: {json.dumps(r['meets'])}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
