"""The fracture network: a flat backbone block list, global average pooling and a small MLP head."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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
    def __init__(self, arch: str, backbone: Backbone, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.arch = arch
        self.features = nn.Sequential(*backbone.blocks)
        self.head = Head(backbone.out_channels, hidden, dropout)
        self.preprocessing = backbone.preprocessing
        self.weights_note = backbone.weights_note
        self.config = {"arch": arch, "hidden": hidden, "dropout": dropout,
                       "backbone_weights": backbone.weights_note}

    @property
    def n_blocks(self) -> int:
        return len(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` normalised input -> ``(N, 2)`` logits (index 1 = fractured)."""
        return self.head(self.features(x))

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the raw Grad-CAM map ``(N, h, w)`` of the last feature maps (ReLU'd).

        Equals h*w times the original paper's Grad-CAM (the head averages the maps before its
        first layer); maps are normalised to [0, 1] before display, so the scale is moot.
        """
        fmap = self.features(x)
        pooled = fmap.mean(dim=(2, 3))
        w = self.head.cam_weights(pooled)
        cam = torch.relu(torch.einsum("nc,nchw->nhw", w, fmap))
        return self.head.forward_pooled(pooled), cam

    def split_at(self, n_trainable: int) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen lower blocks, top ``n_trainable`` blocks)."""
        k = self.n_blocks - max(0, min(n_trainable, self.n_blocks))
        return self.features[:k], self.features[k:]


def save_run_model(model: FractureNet, path: Path, extra_meta: dict | None = None) -> None:
    """Weights as safetensors + ``model.json`` (arch, head, preprocessing) beside them."""
    from bonefrac.models.weights import save_tensors
    from bonefrac.utils import write_json

    save_tensors(model.state_dict(), path)
    meta = {**model.config, "preprocessing": model.preprocessing.to_dict(),
            "weights_file": path.name, **(extra_meta or {})}
    write_json(path.parent / "model.json", meta)


def load_member(arch: str, config: dict, weights: str | Path,
                preprocessing: dict) -> FractureNet:
    """Rebuild a trained member from its config and safetensors weights (never pickle)."""
    from safetensors.torch import load_file

    from bonefrac.models.registry import create_model

    model = create_model(arch, weights=None, hidden=config["hidden"], dropout=config["dropout"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.preprocessing = Preprocessing.from_dict(preprocessing)
    return model.eval()
