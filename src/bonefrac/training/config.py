"""Training hyper-parameters (torch-free, so the CLI can show defaults without torch).

Each field carries its ``bonefrac train`` option in its metadata (:func:`option`), and
:mod:`bonefrac.cli.train` builds the parser from :func:`dataclasses.fields`: a new
hyper-parameter is one field here, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bonefrac import InputError
from bonefrac.data.preprocess import RESIZE_MODES
from bonefrac.evaluation.thresholds import DEFAULT_POLICY


def option(default: Any, help: str, *, flag: str | None = None,
           choices: Sequence[str] | None = None, parse: Callable[[Any], Any] | None = None,
           show: Callable[[Any], Any] | None = None) -> Any:
    """A field with its command-line option, described in the field's ``metadata``.

    ``help``: the option's text (``--help`` appends the real default unless the text says it);
    ``flag``: the option when it is not ``--`` + the field name with dashes; ``choices``: the
    accepted command-line spellings; ``parse``: command-line value -> field value; ``show``:
    field value -> command-line value (the default as the parser holds it). The value's type
    comes from the annotation (``int | None`` parses as int, ``tuple[float, ...]`` as any
    number of floats).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse, "show": show}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def _none_word(value: str) -> str | None:
    """``none`` (any case) means no file: ``--weights none`` is random initialisation."""
    return None if value.lower() == "none" else value


def _bn_mode(train_bn: bool) -> str:
    return "train" if train_bn else "frozen"


def _bn_train(mode: str) -> bool:
    return mode == "train"


@dataclass
class TrainConfig:
    """Defaults are the documented recipe of the shipped models (see README)."""

    arch: str = option(
        "mobilenetv2",
        "mobilenetv2, efficientnet_lite0 (offline ImageNet weights) or efficientnet_b0 (no "
        "package ships its ImageNet weights: pass --weights FILE, or have network access, or "
        "--weights none)")
    weights: str | None = option(
        "imagenet", "'imagenet', a state-dict FILE (.safetensors / .pth, read without pickle), "
        "or 'none' for random initialisation", parse=_none_word)
    epochs_frozen: int = option(
        20, "stage 1: at most this many epochs training the head, backbone frozen")
    epochs_finetune: int = option(
        12, "stage 2: at most this many epochs fine-tuning the top blocks + head")
    unfreeze_blocks: int = option(12, "how many top backbone blocks stage 2 fine-tunes")
    # One clean + 11 augmented views: each fine-tuning epoch sees a fresh augmentation. Measured
    # on a GPU (experiments/recipe_sweep, MobileNetV2 validation AUC): 4 views cycled 0.894 vs a
    # new augmentation every epoch 0.905 (peak rate 1e-4); 12 views at 3e-4: 0.904 and 0.905.
    views: int = option(12, "cached views per training image: 1 clean + N-1 augmented; "
                            "fine-tuning epoch e uses view (e-1) mod N")
    batch_size: int = option(
        64, "images per optimisation step (the global batch under torchrun)")
    lr_frozen: float = option(1e-3, "stage 1 learning rate (Adam)")
    # Peak of the one-cycle schedule. With BatchNorm frozen, 3e-4 wrecked the pretrained blocks
    # within a few steps; with BatchNorm in train mode it is the best rate measured.
    lr_finetune: float = option(3e-4, "stage 2 peak learning rate (Adam)")
    # Further fine-tuning runs, one per peak rate, each from stage 1's best weights like the first;
    # the model is then the uniform average of all runs' best weights (a "model soup",
    # Wortsman et al. 2022): one model's inference cost for an output average's accuracy.
    soup_lrs: tuple[float, ...] = option(
        (), "peak rates of further fine-tuning runs from stage 1's weights; the model is the "
        "average of all runs' weights (a model soup); none: one run")
    weight_decay: float = option(0.0, "Adam's weight decay (L2 penalty), both stages")
    patience: int = option(5, "early-stopping patience")
    hidden: int = option(256, "head's dense width")
    dropout: float = option(0.3, "dropout before the head's last layer")
    seed: int = option(0, "random seed (weights, augmentation, and the split of a folder "
                          "without manifest.csv)")
    val_frac: float = option(
        0.1, "share of the images in the validation split, for a folder without manifest.csv")
    test_frac: float = option(
        0.1, "share of the images in the test split, for a folder without manifest.csv")
    max_images: int | None = option(  # per split, for smoke tests
        None, "use at most N images per split (smoke tests); default: all")
    size: int | None = option(  # override the backbone's input size
        None, "input size in pixels (square); default: the backbone's own, 224")
    resize: str = option(
        "stretch", "how an image becomes the square input: stretch (each side to --size) or "
        "letterbox (aspect kept, black bars)", choices=RESIZE_MODES)
    threshold_policy: str = option(
        DEFAULT_POLICY, "how to choose the decision threshold on the VALIDATION split: "
        "sensitivity:X, specificity:X, youden or fixed:X")
    # BatchNorm of the fine-tuned blocks in train mode (batch statistics, running stats updated)
    # instead of frozen; measured here to tolerate 30x higher fine-tuning rates.
    train_bn: bool = option(
        True, "BatchNorm of the fine-tuned blocks: batch statistics (train) or the ImageNet "
        "statistics (frozen)", flag="--bn", choices=("train", "frozen"), parse=_bn_train,
        show=_bn_mode)
    # What early stopping (and ReduceLROnPlateau) watch. Validation loss keeps rising while AUC
    # improves (fine-tuning makes the model over-confident; calibration fixes that afterwards).
    # Not "--monitor": torchrun's parser would take it for an abbreviation of its own option.
    monitor: str = option("val_auc", "what early stopping (and the plateau schedule) watch",
                          flag="--stop-on", choices=("val_loss", "val_auc", "val_ap50"))
    # Stage 2's schedule: "onecycle" (10 % warm-up to lr_finetune, cosine decay to ~0, stepped
    # per batch) or "plateau" (ReduceLROnPlateau x0.3, as stage 1 always uses).
    schedule: str = option("onecycle", "stage 2's learning-rate schedule",
                           choices=("onecycle", "plateau"))
    # Cross-entropy label smoothing (0 = off): softer targets against the over-confidence above.
    label_smoothing: float = option(0.0, "cross-entropy label smoothing, 0 to 1 (0 = off)")
    # Decay of an exponential moving average of the trained weights, updated every step (0 = off).
    # With it on, validation, early stopping and the saved model use the averaged weights.
    ema: float = option(0.0, "decay of a moving average of the weights, updated every step; "
                             "validation, early stopping and the saved model use it (0 = off)")
    # Mixup's Beta(a, a) parameter (0 = off): each batch is blended with a shuffled copy of itself
    # (cached activations in stage 2, pooled features in stage 1), and so are the targets.
    mixup: float = option(0.0, "mixup's Beta(a, a) parameter a, e.g. 0.2 (0 = off)")
    # Box supervision: with fracture boxes (the data set's boxes.csv, or this file), a 1x1-conv
    # fracture map on the last feature map is trained against per-cell box targets (all zero on
    # non-fractured images) with this loss weight, beside the classification loss (0 = off).
    loc_weight: float = option(
        1.0, "weight of the fracture-map loss when the data set has boxes.csv (or --boxes); "
        "0 trains without box supervision")
    boxes: str | None = option(  # a boxes.csv; default: the data set's own, if it has one
        None, "a boxes.csv (path,x0,y0,x1,y1 as fractions); default: DATA/boxes.csv if present")
    # BCE positive-class weight of the fracture map: boxes cover few cells.
    loc_pos_weight: float = option(
        5.0, "positive-class weight of the fracture-map loss (boxes cover few cells)")
    # Detection: an FCOS-style head on the feature maps at strides 8/16/32, trained against the
    # same boxes with this loss weight (0 = off); --stop-on val_ap50 early-stops on its AP@0.5.
    det_weight: float = option(
        0.0, "weight of the detection-head loss (FCOS-style boxes; needs boxes.csv); 0 = no "
        "detection head")
    # Warm start: initialise every layer the file holds from a trained member's safetensors
    # (a run folder, an ensemble folder's member of the same arch, or a .safetensors file).
    init_from: str | None = option(
        None, "warm start from a trained model: a run folder, an ensemble folder (its member "
        "of --arch) or a .safetensors file; default: ImageNet")

    def __post_init__(self) -> None:
        """Refuse nonsense before any work starts, naming the option."""
        for name in ("label_smoothing", "ema"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.loc_weight < 0 or self.loc_pos_weight <= 0:
            raise InputError("loc_weight must be >= 0 (0 = off) and loc_pos_weight > 0, got "
                             f"{self.loc_weight}, {self.loc_pos_weight}")
        if self.det_weight < 0:
            raise InputError(f"det_weight must be >= 0 (0 = off), got {self.det_weight}")
        if self.mixup < 0:
            raise InputError(f"mixup must be >= 0 (0 = off), got {self.mixup}")
        if any(lr <= 0 for lr in (self.lr_frozen, self.lr_finetune, *self.soup_lrs)):
            raise InputError("learning rates must be > 0, got "
                             f"{[self.lr_frozen, self.lr_finetune, *self.soup_lrs]}")
