"""Training hyper-parameters (torch-free, so the CLI can show defaults without torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    arch: str = "mobilenetv2"
    weights: str | None = "imagenet"
    epochs_frozen: int = 20
    epochs_finetune: int = 15
    unfreeze_blocks: int = 5
    views: int = 4
    batch_size: int = 64
    lr_frozen: float = 1e-3
    lr_finetune: float = 3e-5  # higher rates wreck the pretrained blocks (BN frozen)
    weight_decay: float = 0.0
    patience: int = 4
    hidden: int = 256
    dropout: float = 0.3
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1
    max_images: int | None = None  # per split, for smoke tests
    size: int | None = None  # override the backbone's input size (smoke tests)
    threshold_policy: str = "sensitivity:0.95"
