"""Export trained members to ONNX (torch needed here; prediction then runs without it)."""

from bonefrac.export.onnx import export_member, export_model

__all__ = ["export_member", "export_model"]
