"""``bonefrac predict``: P(fracture) per image with the shipped ensemble (ONNX, no torch)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bonefrac.cli.common import add_model_arg, resolve_model


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="image/DICOM files and/or folders (recursive)")
    add_model_arg(p)
    p.add_argument("--out", default="inference_outputs", help="output folder")
    p.add_argument("--explain", action="store_true",
                   help="also write Grad-CAM heat-map overlays to OUT/heatmaps/")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from bonefrac import DISCLAIMER
    from bonefrac.cli.main import EXIT_OK, EXIT_PARTIAL, CLIError
    from bonefrac.inference.ensemble import Ensemble
    from bonefrac.inference.predict import list_inputs, predict_files, write_outputs

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"output folder {out} is not writable")
    ens = Ensemble.load(resolve_model(args.model), backend=args.backend, threads=args.threads)
    files, missing = list_inputs(args.inputs)
    res = predict_files(ens, files, batch_size=args.batch_size, explain=args.explain,
                        heatmap_dir=out / "heatmaps", progress=not args.quiet)
    res.errors = missing + res.errors
    write_outputs(out, res, ens)
    for e in res.errors:
        print(f"error: {e['file']}: {e['reason']}", file=sys.stderr)
    print(f"{len(res.rows)} image(s) predicted, {len(res.errors)} failed -> {out}/"
          "predictions.csv")
    print(DISCLAIMER)
    return EXIT_PARTIAL if res.errors else EXIT_OK
