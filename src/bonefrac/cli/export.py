"""``bonefrac export``: ONNX files (dynamic batch) + ensemble_meta.json with sha256s."""

from __future__ import annotations

from bonefrac.cli.common import add_model_arg, resolve_model
from bonefrac.cli.extras import require_extra


def add_arguments(p) -> None:
    add_model_arg(p)
    p.add_argument("--out", required=True,
                   help="folder for the ONNX files (may be the model folder itself)")


def run(args) -> int:
    require_extra("train", "export")
    from bonefrac.export.onnx import export_model

    out = export_model(resolve_model(args.model), args.out)
    print(f"exported to {out}")
    return 0
