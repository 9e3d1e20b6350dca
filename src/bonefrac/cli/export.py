"""``bonefrac export``: ONNX files (dynamic batch) + ensemble_meta.json with sha256s."""

from __future__ import annotations

from bonefrac.cli.common import add_model_arg, resolve_model


def add_arguments(p) -> None:
    add_model_arg(p)
    p.add_argument("--out", required=True)


def run(args) -> int:
    from bonefrac.export.onnx import export_model

    out = export_model(resolve_model(args.model), args.out)
    print(f"exported to {out}")
    return 0
