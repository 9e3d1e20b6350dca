"""Arguments and helpers shared by several commands."""

from __future__ import annotations

from pathlib import Path

from bonefrac.evaluation.thresholds import DEFAULT_POLICY

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_MODEL = PRETRAINED / "ensemble_bone-fracture_v1"
BASELINE_MODEL = PRETRAINED / "mobilenetv2_bone-fracture_v1"
SHORT_NAMES = {"ensemble": DEFAULT_MODEL, "baseline": BASELINE_MODEL}


def resolve_model(value: str | None) -> Path:
    """``--model`` value: a folder, or 'ensemble' / 'baseline' for the shipped models."""
    if value is None:
        return DEFAULT_MODEL
    return SHORT_NAMES.get(value, Path(value))


def add_model_arg(p, help_extra: str = "") -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder (ensemble or training run), or 'ensemble' / 'baseline' "
                        f"for the shipped models; default: the shipped ensemble. {help_extra}")


def add_policy_arg(p) -> None:
    p.add_argument("--threshold-policy", default=DEFAULT_POLICY,
                   help="how to choose the decision threshold on the VALIDATION split: "
                        "sensitivity:X, specificity:X, youden or fixed:X")


def load_index_args(args, all_test: bool = False):
    from bonefrac.data.dataset import load_index

    index = load_index(args.data, seed=getattr(args, "seed", 0), all_test=all_test)
    print(index.summary(), flush=True)
    return index
