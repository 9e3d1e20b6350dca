"""``bonefrac models``: the architectures ``bonefrac train --arch`` takes.

The registry (:func:`bonefrac.models.list_models`) imports torch, torchvision and timm to
build it, which the light install lacks and which takes seconds. So the names and descriptions
are also written here, torch-free; ``tests/test_models.py`` checks them against the registry.
"""

from __future__ import annotations

# name -> description, exactly as the registry has them
ARCHITECTURES: dict[str, str] = {
    "efficientnet_lite0": "EfficientNet-Lite0 (timm tf_efficientnet_lite0), ImageNet-1k "
                          "weights, offline",
    "efficientnet_b0": "EfficientNet-B0 (torchvision); needs --weights FILE or network (none "
                       "ship here)",
    "mobilenetv2": "MobileNetV2 (torchvision), ImageNet-1k weights, offline",
}


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    for name, desc in ARCHITECTURES.items():
        print(f"{name:20s} {desc}")
    return 0
