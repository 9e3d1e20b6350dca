"""bonefrac: fracture / no-fracture classification of musculoskeletal radiographs.

RESEARCH USE ONLY. Not a medical device; never use its output for clinical decisions.

Public API (kept small on purpose)::

    import bonefrac
    bonefrac.models.create_model("mobilenetv2")          # torch, needs the [train] extra
    bonefrac.inference.Ensemble.load("path/to/model")    # ONNX Runtime, no torch
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "RESEARCH USE ONLY - not a medical device and not for clinical decisions. "
    "Outputs may be wrong; a qualified radiologist must read every image."
)

# Class index 1 is the positive class: the probability we report is P(fractured).
CLASSES: tuple[str, str] = ("non_fractured", "fractured")

# What a member's heat-map output is: a box-supervised per-cell P(fracture), or Grad-CAM.
FRACTURE_MAP, GRADCAM = "fracture_map", "gradcam"
