"""Arguments, errors and helpers shared by several commands.

``CLIError`` lives here, below every command module and ``main``, so commands import it at the
top instead of reaching back up into ``main`` inside their functions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bonefrac.evaluation.thresholds import DEFAULT_POLICY

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 1, no traceback."""


def check_writable(out: Path) -> None:
    """Create ``out`` and prove it writable with a real file (``os.access`` lies for root), so
    an unwritable output folder fails the run before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".bonefrac-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"output folder {out} is not writable: {e.strerror or e}") from None

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
