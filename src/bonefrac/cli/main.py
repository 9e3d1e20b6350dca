"""``bonefrac`` entry point. Commands import their heavy dependencies (torch) lazily, so that
``bonefrac predict`` starts fast and works on the light, torch-free install; a command that
needs an extra checks for it first (:mod:`bonefrac.cli.extras`).

Errors bonefrac raises on purpose (:class:`bonefrac.BonefracError` and its subclasses, a file
system that says no, a missing optional extra) print one line; anything else is a bug: one line
says so and where its traceback was written (:func:`is_expected`, :func:`report_bug`).

Exit codes: 0 success; 1 error (bad model, unwritable output, missing dependency, ...);
2 usage error; 3 prediction finished but some input files failed (listed in the outputs).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bonefrac import DISCLAIMER, BonefracError, __version__
from bonefrac.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    CLIError,
    HelpFormatter,
)
from bonefrac.utils import cache_dir, write_text

# command name -> module in bonefrac.cli with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "predict": ("predict", "predict P(fracture) for images, DICOM files or folders (ONNX)"),
    "merge-predictions": ("merge", "join the outputs of `predict --shard K/N` runs"),
    "train": ("train", "train a member by two-stage transfer learning (needs [train])"),
    "evaluate": ("evaluate", "evaluate a run or ensemble on a labelled folder (needs [eval])"),
    "ensemble": ("ensemble", "fit an ensemble from trained runs (needs [train])"),
    "adapt": ("adapt", "fine-tune or recalibrate a model on a new site's labelled images"),
    "site-check": ("site_check", "how a model meets a new site's unlabelled images: gate "
                                 "flags, distributions, advice (text + HTML)"),
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
           "build_parser", "is_expected", "main", "report_bug"]

# Failures reported on purpose: one line each. OSError covers FileNotFoundError /
# FileExistsError / PermissionError (a file system that says no is not a bug).
EXPECTED_ERRORS = (BonefracError, OSError)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only`` (a command name), only that command's
    arguments are added (the others are listed by name): a command's module may import what
    it needs to describe its options, and ``bonefrac predict`` should not wait for that."""
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
        if only is None or only == name:
            _module(module).add_arguments(sp)
    return p


def _module(name: str):
    return importlib.import_module(f"bonefrac.cli.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        return int(_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if is_expected(e):
            print(f"bonefrac {args.command}: error: {e}", file=sys.stderr)
        else:
            log = report_bug(args.command, e)
            print(f"bonefrac {args.command}: internal error (a bug in bonefrac, please report "
                  f"it): {type(e).__name__}: {e}; traceback written to {log}", file=sys.stderr)
        return EXIT_ERROR


def is_expected(e: BaseException) -> bool:
    """Whether ``e`` is a failure bonefrac reports on purpose rather than a bug: a
    :class:`bonefrac.BonefracError`, an ``OSError``, or a missing third-party module (an
    optional extra not installed: a setup problem). Everything else (a ``ValueError`` from
    numpy, a ``KeyError`` from a dict lookup, ...) is a bug."""
    if isinstance(e, EXPECTED_ERRORS):
        return True
    if isinstance(e, ModuleNotFoundError):
        return bool(e.name) and e.name.partition(".")[0] != "bonefrac"
    return False


def report_bug(command: str, e: BaseException) -> Path:
    """Write ``e``'s traceback (with the version and command) to a log file and return its
    path: under ``bonefrac.utils.cache_dir()/crash``, else the temporary directory."""
    text = (f"bonefrac {__version__}, command {command!r}, Python {sys.version.split()[0]}\n"
            + "".join(traceback.format_exception(e)))
    name = f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{id(e):x}.log"
    for folder in (lambda: cache_dir() / "crash", lambda: Path(tempfile.gettempdir())):
        try:
            path = folder() / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, text)
            return path
        except OSError:
            continue
    sys.stderr.write(text)  # nowhere to write it: the traceback itself, on stderr
    return Path("<stderr>")


if __name__ == "__main__":
    sys.exit(main())
