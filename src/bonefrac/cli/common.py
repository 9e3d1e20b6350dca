"""Arguments, errors and helpers shared by several commands.

``CLIError`` lives here, below every command module and ``main``, so commands import it at the
top instead of reaching back up into ``main`` inside their functions.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bonefrac import BonefracError
from bonefrac.evaluation.thresholds import DEFAULT_POLICY

# Model names are resolved on the torch-free inference side (bonefrac.load uses them too);
# re-exported here for the commands and benchmarks that import them from this module.
from bonefrac.inference.model_folder import (  # noqa: F401
    BASELINE_MODEL,
    DEFAULT_MODEL,
    PRETRAINED,
    SHORT_NAMES,
    ModelFolder,
    model_kind,
)
from bonefrac.inference.model_folder import resolve_model as resolve_name

# The shipped models' short names, as the messages list them (SHORT_NAMES also has aliases).
SHIPPED_NAMES = ("ensemble", "ensemble-v2", "ensemble-224", "baseline")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class CLIError(BonefracError):
    """An expected failure: printed as one line, exit code 1, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's real default: appended as ``(default: X)`` where the
    default is a value; left out where there is none to show (None, a suppressed default, a
    required option, an on/off flag) or the help text already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.required
                or isinstance(action.default, bool) or "default:" in text.lower()
                or not action.option_strings):
            return text
        return super()._get_help_string(action)


def resolve_model(value: str | os.PathLike | None, option: str = "--model") -> Path:
    """The model folder of a ``--model`` value (:func:`bonefrac.inference.model_folder.
    resolve_model`), refused in one line when it is neither a shipped name nor a model folder
    that exists: a mistyped name must not read as a broken model."""
    root = resolve_name(value)
    shipped = ", ".join(SHIPPED_NAMES)
    if not root.exists():
        raise CLIError(f"{option} {value}: {root} does not exist; give a model folder or a "
                       f"shipped model name ({shipped})")
    if model_kind(root) is None:
        raise CLIError(f"{option} {value}: {root} is not a bonefrac model folder (no "
                       f"ensemble_meta.json or model.json); shipped models: {shipped}")
    return root


def torch_note(root: Path, backend: str) -> str:
    """'' unless ``--backend auto`` will run a member of ``root`` with PyTorch (no ONNX
    export: seconds to start instead of milliseconds); then the line that says so."""
    if backend != "auto":
        return ""
    folder = ModelFolder.open(root)
    if all(m.onnx for m in folder.spec.members):
        return ""
    return (f"note: {root} has no ONNX export, so --backend auto runs it with PyTorch (slow "
            f"to start); export it once: bonefrac export --model {root} --out {root}")


def input_folder(value: str, option: str) -> Path:
    """An input folder option's value, refused in one line when missing or a file."""
    path = Path(value)
    if not path.exists():
        raise CLIError(f"{option} {value} does not exist")
    if not path.is_dir():
        raise CLIError(f"{option} {value} is a file, not a folder")
    return path


def check_writable(out: Path, option: str = "--out") -> None:
    """Create ``out`` and prove it writable with a real file (``os.access`` lies for root), so
    an unwritable output folder fails the run before any work is done."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{option} {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".bonefrac-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"output folder {out} is not writable: {e.strerror or e}") from None


def add_model_arg(p, help_extra: str = "") -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="model folder (ensemble or training run), or a shipped model: "
                        "'ensemble' (v2, 320 px), 'ensemble-224' (v1) or 'baseline'; default: "
                        f"'ensemble'. {help_extra}")


def add_policy_arg(p) -> None:
    p.add_argument("--threshold-policy", default=DEFAULT_POLICY,
                   help="how to choose the decision threshold on the VALIDATION split: "
                        "sensitivity:X, specificity:X, youden or fixed:X")


def load_index_args(args, all_test: bool = False):
    from bonefrac.data.dataset import load_index

    index = load_index(args.data, seed=getattr(args, "seed", 0), all_test=all_test)
    print(index.summary(), flush=True)
    return index
