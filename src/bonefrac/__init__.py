"""bonefrac: fracture / no-fracture classification of musculoskeletal radiographs.

RESEARCH USE ONLY. Not a medical device; never use its output for clinical decisions.

Public API (kept small on purpose)::

    import bonefrac
    model = bonefrac.load("ensemble")                    # ONNX Runtime, no torch
    result = model.predict("scan.jpg")                   # bonefrac.Result (CSV column names)
    bonefrac.evaluate(model, "DATA_DIR", split="test")   # metrics + Results/ (needs [eval])
    bonefrac.inference.Ensemble.load("path/to/model")    # the lower-level ensemble
    bonefrac.models.create_model("mobilenetv2")          # torch, needs the [train] extra

``import bonefrac`` imports nothing but this module: the names above are loaded on first use
(module ``__getattr__``), so the import stays fast and torch-free.
"""

import importlib

__version__ = "0.1.0"

DISCLAIMER = (
    "RESEARCH USE ONLY - not a medical device and not for clinical decisions. "
    "Outputs may be wrong; a qualified radiologist must read every image."
)

# Class index 1 is the positive class: the probability we report is P(fractured).
CLASSES: tuple[str, str] = ("non_fractured", "fractured")

# What a member's heat-map output is: a box-supervised per-cell P(fracture), or Grad-CAM.
FRACTURE_MAP, GRADCAM = "fracture_map", "gradcam"



class BonefracError(Exception):
    """Base of every error bonefrac raises on purpose: bad input, a bad model folder or
    configuration. Its message is meant for the user as is: the CLI prints it as one line
    (``bonefrac COMMAND: error: MESSAGE``, exit 1); anything else that escapes is a bug, and
    the CLI writes its traceback to a log file. Subclasses keep their historical bases too
    (``ValueError``, ...) so that existing ``except`` clauses still catch them."""


class InputError(BonefracError, ValueError):
    """A value the user gave (an argument, option, configuration, policy or data set) that
    cannot be used as given; the message names it and says why."""


class UnknownNameError(BonefracError, KeyError):
    """A name that is not registered (an architecture, ...); the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# Lazy attributes: name -> (module, attribute); subpackages load as themselves.
_LAZY = {
    "load": ("bonefrac.inference.api", "load"),
    "Model": ("bonefrac.inference.api", "Model"),
    "Result": ("bonefrac.inference.api", "Result"),
    "evaluate": ("bonefrac.evaluation.api", "evaluate"),
}
_SUBPACKAGES = ("cli", "data", "evaluation", "export", "inference", "models", "serving",
                "training", "utils")

__all__ = ["CLASSES", "DISCLAIMER", "FRACTURE_MAP", "GRADCAM", "BonefracError", "InputError",
           "Model", "Result", "UnknownNameError", "__version__", "evaluate", "load"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"bonefrac.{name}")
    else:
        raise AttributeError(f"module 'bonefrac' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
