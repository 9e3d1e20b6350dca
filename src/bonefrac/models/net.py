"""The fracture network: a flat backbone block list, global average pooling and a small MLP head."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bonefrac import FRACTURE_MAP, GRADCAM
from bonefrac.data.preprocess import Preprocessing


@dataclass
class Backbone:
    """A pretrained feature extractor, flattened to blocks so the top N can be unfrozen."""

    blocks: list[nn.Module]
    out_channels: int
    preprocessing: Preprocessing
    weights_note: str  # what the weights were trained on, e.g. "ImageNet-1k (torchvision)"
    extra: dict = field(default_factory=dict)


class Head(nn.Module):
    """GAP -> Dense+ReLU -> Dropout -> Dense(2); softmax is applied to its logits downstream."""

    def __init__(self, in_channels: int, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 2)

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(pooled))))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(fmap.mean(dim=(2, 3)))

    def cam_weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """Grad-CAM channel weights d(z_fractured - z_non)/d(pooled), closed form: ``(N, C)``.

        The head is GAP then ReLU MLP, so the gradient is W1^T (relu'(h) * (w2_1 - w2_0));
        computed in the forward graph so an ONNX export can emit Grad-CAM without autograd.
        """
        h = self.fc1(pooled)
        w2 = self.fc2.weight[1] - self.fc2.weight[0]  # (hidden,)
        return ((h > 0).to(pooled.dtype) * w2) @ self.fc1.weight


class FractureNet(nn.Module):
    """Backbone blocks -> last feature map -> classification head (and, with ``loc_head``, a
    1x1-conv fracture map: one logit per feature-map cell, trained against fracture boxes).

    ``heatmap`` says which map ``forward_with_cam`` emits: ``"fracture_map"`` (sigmoid of the
    loc head) or ``"gradcam"`` (closed-form Grad-CAM of the fracture logit).
    """

    def __init__(self, arch: str, backbone: Backbone, hidden: int = 256, dropout: float = 0.3,
                 loc_head: bool = False, det_head: bool = False):
        super().__init__()
        self.arch = arch
        self.features = nn.Sequential(*backbone.blocks)
        self.head = Head(backbone.out_channels, hidden, dropout)
        self.loc = nn.Conv2d(backbone.out_channels, 1, 1) if loc_head else None
        self.preprocessing = backbone.preprocessing
        self.weights_note = backbone.weights_note
        self.config = {"arch": arch, "hidden": hidden, "dropout": dropout,
                       "backbone_weights": backbone.weights_note, "loc_head": loc_head,
                       "heatmap": FRACTURE_MAP if loc_head else GRADCAM}
        self.det, self.taps = None, []
        if det_head:  # FCOS-style boxes on the feature maps at strides 8/16/32
            from bonefrac.models.detect import STRIDES, DetectionHead, feature_taps

            self.taps, channels = feature_taps(self.features)
            self.det = DetectionHead(channels, STRIDES)
            self.config["detector"] = {"kind": "fcos", "strides": list(STRIDES),
                                       "taps": self.taps}

    @property
    def n_blocks(self) -> int:
        return len(self.features)

    @property
    def heatmap(self) -> str:
        return self.config["heatmap"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised input -> last feature map ``(N, C, h, w)``."""
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> ``(N, 2)`` logits (index 1 = fractured)."""
        return self.head(fmap)

    def forward_loc(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> fracture-map logits ``(N, h, w)`` (needs ``loc_head``)."""
        return self.loc(fmap)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised input -> ``(N, 2)`` logits (index 1 = fractured)."""
        return self.forward_head(self.forward_features(x))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the heat map ``(N, h, w)`` named by ``heatmap``.

        Fracture map: per-cell P(fracture) in [0, 1]. Grad-CAM: ReLU'd, h*w times the original
        paper's Grad-CAM (the head averages the maps before its first layer); such maps are
        normalised to [0, 1] before display, so the scale is moot.
        """
        logits, cam, _ = self.forward_outputs(x)
        return logits, cam

    def forward_outputs(self, x: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``(N, 2)``, the heat map ``(N, h, w)`` (see :meth:`forward_with_cam`) and the
        pooled backbone features ``(N, C)`` that the input-domain gate measures."""
        fmap = self.features(x)
        pooled = fmap.mean(dim=(2, 3))
        logits = self.head.forward_pooled(pooled)
        if self.heatmap == FRACTURE_MAP:
            return logits, torch.sigmoid(self.forward_loc(fmap)), pooled
        w = self.head.cam_weights(pooled)
        return logits, torch.relu(torch.einsum("nc,nchw->nhw", w, fmap)), pooled

    @property
    def output_names(self) -> list[str]:
        """What :meth:`forward_export` (and so the ONNX graph) emits, in order."""
        return ["logits", "cam", "pooled", *(["det"] if self.det is not None else [])]

    def forward_export(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`forward_outputs`, plus the raw detections ``(N, L, 6)`` with a detection
        head (whose model always has the fracture map: it trains on the same boxes)."""
        if self.det is None:
            return self.forward_outputs(x)
        logits, maps, pooled, det = self.forward_detect(x)
        return logits, torch.sigmoid(maps), pooled, det

    def forward_taps(self, x: torch.Tensor, start: int = 0) -> list[torch.Tensor]:
        """The feature maps at ``self.taps`` (finest first; the last is the last block's map).

        ``start``: run blocks from this index on ``x`` (activations of block ``start - 1``, as
        the training cache holds them); a tap below ``start`` must be that input itself.
        """
        taps, out = set(self.taps), []
        if start - 1 in taps:
            out.append(x)
        for i in range(start, self.n_blocks):
            x = self.features[i](x)
            if i in taps:
                out.append(x)
        return out

    def forward_detect(self, x: torch.Tensor, start: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Logits ``(N, 2)``, fracture-map logits ``(N, h, w)`` (None without ``loc_head``),
        pooled features ``(N, C)`` and raw detections ``(N, L, 6)`` (see
        :mod:`bonefrac.models.detect`), from one pass (``start``: see :meth:`forward_taps`)."""
        feats = self.forward_taps(x, start)
        fmap = feats[-1]
        pooled = fmap.mean(dim=(2, 3))
        maps = self.forward_loc(fmap) if self.loc is not None else None
        return self.head.forward_pooled(pooled), maps, pooled, self.det(feats)

    def split_at(self, n_trainable: int) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen lower blocks, top ``n_trainable`` blocks)."""
        k = self.n_blocks - max(0, min(n_trainable, self.n_blocks))
        return self.features[:k], self.features[k:]


def save_run_model(model: FractureNet, path: Path, extra_meta: dict | None = None) -> dict:
    """Weights as safetensors at ``path``; returns the run's ``model.json`` content (arch,
    head, preprocessing), which the caller writes with
    :func:`bonefrac.inference.spec.write_run_meta` (the one writer of the file)."""
    from bonefrac.models.weights import save_tensors

    save_tensors(model.state_dict(), path)
    return {**model.config, "preprocessing": model.preprocessing.to_dict(),
            "weights_file": path.name, **(extra_meta or {})}


def load_member(arch: str, config: dict, weights: str | Path,
                preprocessing: Preprocessing | dict) -> FractureNet:
    """Rebuild a trained member from its config and safetensors weights (never pickle);
    ``preprocessing``: the member's, whole (or its JSON dict)."""
    from safetensors.torch import load_file

    from bonefrac.models.registry import create_model

    model = create_model(arch, weights=None, hidden=config["hidden"], dropout=config["dropout"],
                         loc_head=bool(config.get("loc_head", False)),
                         det_head=bool(config.get("detector")))
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.config["heatmap"] = config.get("heatmap", model.heatmap)
    model.preprocessing = (preprocessing if isinstance(preprocessing, Preprocessing)
                           else Preprocessing.from_dict(preprocessing))
    return model.eval()
