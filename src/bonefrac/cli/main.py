"""``bonefrac`` entry point. Commands import their heavy dependencies (torch) lazily, so that
``bonefrac predict`` starts fast and works on the light, torch-free install; a command that
needs an extra checks for it first (:mod:`bonefrac.cli.extras`).

Errors bonefrac raises on purpose print one line; anything else is a bug and keeps its
traceback (:func:`is_expected`).

Exit codes: 0 success; 1 error (bad model, unwritable output, missing dependency, ...);
2 usage error; 3 prediction finished but some input files failed (listed in the outputs).
"""

from __future__ import annotations

import argparse
import importlib
import linecache
import sys
from pathlib import Path

from bonefrac import DISCLAIMER, __version__
from bonefrac.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    CLIError,
    HelpFormatter,
)
from bonefrac.data.boxes import BoxFileError
from bonefrac.data.io import ImageReadError
from bonefrac.inference.model_folder import ModelFileError

# command name -> module in bonefrac.cli with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "predict": ("predict", "predict P(fracture) for images, DICOM files or folders (ONNX)"),
    "merge-predictions": ("merge", "join the outputs of `predict --shard K/N` runs"),
    "train": ("train", "train a member by two-stage transfer learning (needs [train])"),
    "evaluate": ("evaluate", "evaluate a run or ensemble on a labelled folder (needs [eval])"),
    "ensemble": ("ensemble", "fit an ensemble from trained runs (needs [train])"),
    "adapt": ("adapt", "fine-tune or recalibrate a model on a new site's labelled images"),
    "export": ("export", "export a run or ensemble to ONNX (needs [train])"),
    "models": ("models", "list the registered architectures"),
    "report": ("report", "self-contained HTML report + MODEL_CARD.md from evaluation results"),
    "serve": ("serve", "REST API and web page with heat maps (needs [serve])"),
    "dicom-node": ("dicom_node", "DICOM node: receive studies, send SR + heat maps back "
                                 "(needs [dicom-node])"),
    "token": ("token", "create, list or revoke the API tokens of `serve --token-file`"),
    "audit": ("audit", "verify the hash chain of a `serve --audit-log` file"),
}

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "CLIError",
           "build_parser", "is_expected", "main"]

# Failures bonefrac reports on purpose (a bad input, model or output folder, a file system that
# says no): one line each. OSError covers FileNotFoundError / FileExistsError / PermissionError.
EXPECTED_ERRORS = (CLIError, ModelFileError, ImageReadError, BoxFileError, OSError)
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bonefrac",
        description="Fracture / no-fracture classification of musculoskeletal radiographs.",
        epilog=DISCLAIMER + " Exit codes: 0 ok, 1 error, 2 usage, 3 some inputs failed.")
    p.add_argument("--version", action="version", version=f"bonefrac {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_,
                            formatter_class=HelpFormatter)
        sp.set_defaults(_module=module)
        _module(module).add_arguments(sp)
    return p


def _module(name: str):
    return importlib.import_module(f"bonefrac.cli.{name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_expected(e):
            raise  # a bug: the traceback is what a bug report needs
        print(f"bonefrac {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def is_expected(e: BaseException) -> bool:
    """Whether ``e`` is a failure bonefrac reports on purpose rather than a bug.

    ValueError and KeyError are both: config validation, unknown architectures and bad policies
    raise them deliberately, while numpy, a dict lookup or an unpacking raise them by accident.
    So they count as deliberate only when a ``raise`` statement in bonefrac's own source raised
    them. A missing third-party module (an optional extra) is a setup problem, not a bug.
    """
    if isinstance(e, EXPECTED_ERRORS):
        return True
    if isinstance(e, ModuleNotFoundError):
        return bool(e.name) and e.name.partition(".")[0] != "bonefrac"
    return isinstance(e, ValueError | KeyError) and raised_by_bonefrac(e)


def raised_by_bonefrac(e: BaseException) -> bool:
    """True when the innermost frame of ``e``'s traceback is a ``raise`` in the bonefrac package."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not path.is_relative_to(PACKAGE_DIR):
        return False
    return linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise")


if __name__ == "__main__":
    sys.exit(main())
