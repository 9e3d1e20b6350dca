"""Inference: decode -> preprocess -> ONNX Runtime -> calibrated fusion. Imports no torch.

    from bonefrac.inference import Ensemble
    ens = Ensemble.load("models/bonefrac-ensemble-v1")   # verifies every file's sha256
    from bonefrac.inference.predict import predict_files
    result = predict_files(ens, [Path("a.jpg"), Path("b.dcm")])  # rows + per-file errors
"""

from bonefrac.inference.calibration import calibrated_prob, fuse
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.model_folder import ModelFileError, ModelFolder

__all__ = ["Ensemble", "ModelFileError", "ModelFolder", "calibrated_prob", "fuse"]
