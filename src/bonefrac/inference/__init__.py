"""Inference: decode -> preprocess -> ONNX Runtime -> calibrated fusion. Imports no torch.

    from bonefrac.inference import Ensemble
    ens = Ensemble.load("models/bonefrac-ensemble-v1")   # verifies every file's sha256
    out = ens.predict_files(["a.jpg", "b.dcm"])
"""

from bonefrac.inference.ensemble import Ensemble, ModelFileError, fuse

__all__ = ["Ensemble", "ModelFileError", "fuse"]
