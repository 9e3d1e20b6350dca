"""Name -> backbone builder, in the spirit of timm's ``create_model``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bonefrac import UnknownNameError
from bonefrac.models.net import Backbone, FractureNet

_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = "") -> Callable:
    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


def list_models() -> dict[str, str]:
    _ensure_loaded()
    return dict(_DESCRIPTIONS)


def create_model(name: str, weights: str | None = "imagenet", *, hidden: int = 256,
                 dropout: float = 0.3, loc_head: bool = False,
                 det_head: bool = False, size: int | None = None,
                 resize: str | None = None) -> FractureNet:
    """Build a fracture classifier: a named backbone + GAP -> Dense+ReLU -> Dropout -> Dense(2).

    Args:
        name: a registered architecture (see :func:`list_models`).
        weights: ``"imagenet"`` (the offline ImageNet weights for that backbone), a path to an
            ImageNet state-dict file (.safetensors, or .pth read with ``weights_only=True``), or
            ``None``/``"none"`` for random initialisation.
        loc_head: add the 1x1-conv fracture map trained against fracture boxes.
        det_head: add the FCOS-style detection head (:mod:`bonefrac.models.detect`).
        size, resize: the input square (pixels; ``stretch`` / ``letterbox``) the network is
            built for; None keeps the backbone's own (224 px, stretched), with its mean/std.
    """
    _ensure_loaded()
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown architecture {name!r}; choose from {sorted(_REGISTRY)}")
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    backbone = _REGISTRY[name](weights=weights)
    geometry = {k: v for k, v in (("size", size), ("resize", resize)) if v is not None}
    if geometry:  # set before the network exists: nothing changes it afterwards
        backbone = replace(backbone, preprocessing=replace(backbone.preprocessing, **geometry))
    return FractureNet(name, backbone, hidden=hidden, dropout=dropout, loc_head=loc_head,
                       det_head=det_head)


def _ensure_loaded() -> None:
    # Importing the modules registers their architectures.
    from bonefrac.models import efficientnet, mobilenetv2  # noqa: F401
