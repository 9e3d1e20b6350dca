"""A one-stage, anchor-free (FCOS-style) fracture detector on the classifier's own backbone.

The backbone's last feature maps at strides 8, 16 and 32 go through torchvision's
``FeaturePyramidNetwork``; one tower of depthwise-separable convolutions, shared by the levels,
predicts per location a fracture logit, a centre-ness logit and the distances (left, top,
right, bottom, in input pixels) from the location to the box's sides (Tian et al., FCOS, 2019).

The raw output is one tensor ``(N, L, 6)``: per location of every level, in level order and
row-major within a level, ``[cls_logit, ctr_logit, l, t, r, b]``. Decoding (scores, boxes, NMS)
happens outside the graph, in numpy (:mod:`bonefrac.inference.detect`), so ONNX Runtime
predicts without torch and the export carries no data-dependent shapes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

STRIDES = (8, 16, 32)
PRIOR = 0.01  # initial P(fracture) per location (focal loss's prior)


def _sep_conv(c: int) -> nn.Sequential:
    """3x3 depthwise + 1x1 pointwise, GroupNorm, ReLU: ~9x cheaper than a full 3x3 at ``c``."""
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(8, c), nn.ReLU())


class DetectionHead(nn.Module):
    """FPN over ``in_channels`` (one per stride of ``strides``) + a shared prediction tower."""

    def __init__(self, in_channels: list[int], strides: tuple[int, ...] = STRIDES,
                 width: int = 64, depth: int = 2):
        super().__init__()
        self.strides = tuple(strides)
        self.fpn = FeaturePyramidNetwork(list(in_channels), width)
        self.tower = nn.Sequential(*[_sep_conv(width) for _ in range(depth)])
        self.cls = nn.Conv2d(width, 1, 3, padding=1)
        self.ctr = nn.Conv2d(width, 1, 3, padding=1)
        self.reg = nn.Conv2d(width, 4, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))  # per-level regression scale
        nn.init.constant_(self.cls.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Feature maps, finest first -> ``(N, L, 6)`` raw outputs (see the module doc)."""
        names = [str(i) for i in range(len(feats))]
        pyramid = self.fpn(dict(zip(names, feats, strict=True)))
        outs = []
        for k, name in enumerate(names):
            t = self.tower(pyramid[name])
            # exp keeps distances positive; scaled by the stride so every level starts alike
            dist = torch.exp(self.scales[k] * self.reg(t).clamp(max=8.0)) * self.strides[k]
            out = torch.cat([self.cls(t), self.ctr(t), dist], dim=1)  # (N, 6, h, w)
            outs.append(out.flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)


def feature_taps(blocks: nn.Sequential, strides: tuple[int, ...] = STRIDES, probe: int = 224
                 ) -> tuple[list[int], list[int]]:
    """(index of the last block at each stride of ``strides``, its output channels), found by
    one forward pass of a ``probe``-pixel image."""
    x = torch.zeros(1, 3, probe, probe)
    last: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        for i, b in enumerate(blocks):
            x = b(x)
            last[round(probe / x.shape[-1])] = (i, int(x.shape[1]))
    missing = [s for s in strides if s not in last]
    if missing:
        raise ValueError(f"the backbone has no feature map at stride(s) {missing}")
    return [last[s][0] for s in strides], [last[s][1] for s in strides]
