"""Training hyper-parameters (torch-free, so the CLI can show defaults without torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Defaults are the documented recipe of the shipped models (see README)."""

    arch: str = "mobilenetv2"
    weights: str | None = "imagenet"
    epochs_frozen: int = 20
    epochs_finetune: int = 12
    unfreeze_blocks: int = 12
    # One clean + 11 augmented views: each fine-tuning epoch sees a fresh augmentation. Measured
    # on a GPU (benchmarks/recipe_sweep, MobileNetV2 validation AUC): 4 views cycled 0.894 vs a
    # new augmentation every epoch 0.905 (peak rate 1e-4); 12 views at 3e-4: 0.904 and 0.905.
    views: int = 12
    batch_size: int = 64
    lr_frozen: float = 1e-3
    # Peak of the one-cycle schedule. With BatchNorm frozen, 3e-4 wrecked the pretrained blocks
    # within a few steps; with BatchNorm in train mode it is the best rate measured.
    lr_finetune: float = 3e-4
    # Further fine-tuning runs, one per peak rate, each from stage 1's best weights like the first;
    # the model is then the uniform average of all runs' best weights (a "model soup",
    # Wortsman et al. 2022): one model's inference cost for an output average's accuracy.
    soup_lrs: tuple[float, ...] = ()
    weight_decay: float = 0.0
    patience: int = 5
    hidden: int = 256
    dropout: float = 0.3
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1
    max_images: int | None = None  # per split, for smoke tests
    size: int | None = None  # override the backbone's input size (smoke tests)
    threshold_policy: str = "sensitivity:0.95"
    # BatchNorm of the fine-tuned blocks in train mode (batch statistics, running stats updated)
    # instead of frozen; measured here to tolerate 30x higher fine-tuning rates.
    train_bn: bool = True
    # What early stopping (and ReduceLROnPlateau) watch. Validation loss keeps rising while AUC
    # improves (fine-tuning makes the model over-confident; calibration fixes that afterwards).
    monitor: str = "val_auc"
    # Stage 2's schedule: "onecycle" (10 % warm-up to lr_finetune, cosine decay to ~0, stepped
    # per batch) or "plateau" (ReduceLROnPlateau x0.3, as stage 1 always uses).
    schedule: str = "onecycle"
    # Cross-entropy label smoothing (0 = off): softer targets against the over-confidence above.
    label_smoothing: float = 0.0
    # Decay of an exponential moving average of the trained weights, updated every step (0 = off).
    # With it on, validation, early stopping and the saved model use the averaged weights.
    ema: float = 0.0
    # Mixup's Beta(a, a) parameter (0 = off): each batch is blended with a shuffled copy of itself
    # (cached activations in stage 2, pooled features in stage 1), and so are the targets.
    mixup: float = 0.0
    # Box supervision: with fracture boxes (the data set's boxes.csv, or this file), a 1x1-conv
    # fracture map on the last feature map is trained against per-cell box targets (all zero on
    # non-fractured images) with this loss weight, beside the classification loss (0 = off).
    loc_weight: float = 1.0
    boxes: str | None = None  # a boxes.csv; default: the data set's own, if it has one
    # BCE positive-class weight of the fracture map: boxes cover few cells.
    loc_pos_weight: float = 5.0
    # Warm start: initialise every layer the file holds from a trained member's safetensors
    # (a run folder, an ensemble folder's member of the same arch, or a .safetensors file).
    init_from: str | None = None

    def __post_init__(self) -> None:
        """Refuse nonsense before any work starts, naming the option."""
        for name in ("label_smoothing", "ema"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.loc_weight < 0 or self.loc_pos_weight <= 0:
            raise ValueError("loc_weight must be >= 0 (0 = off) and loc_pos_weight > 0, got "
                             f"{self.loc_weight}, {self.loc_pos_weight}")
        if self.mixup < 0:
            raise ValueError(f"mixup must be >= 0 (0 = off), got {self.mixup}")
        if any(lr <= 0 for lr in (self.lr_frozen, self.lr_finetune, *self.soup_lrs)):
            raise ValueError("learning rates must be > 0, got "
                             f"{[self.lr_frozen, self.lr_finetune, *self.soup_lrs]}")
