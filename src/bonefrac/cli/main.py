"""``bonefrac`` entry point. Commands import their heavy dependencies (torch) lazily, so that
``bonefrac predict`` starts fast and works on the light, torch-free install.

Exit codes: 0 success; 1 error (bad model, unwritable output, missing dependency, ...);
2 usage error; 3 prediction finished but some input files failed (listed in the outputs).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bonefrac import DISCLAIMER, __version__

# command name -> module in bonefrac.cli with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "predict": ("predict", "predict P(fracture) for images, DICOM files or folders (ONNX)"),
    "merge-predictions": ("merge", "join the outputs of `predict --shard K/N` runs"),
    "train": ("train", "train a member by two-stage transfer learning (needs [train])"),
    "evaluate": ("evaluate", "evaluate a run or ensemble on a labelled folder"),
    "ensemble": ("ensemble", "fit an ensemble from trained runs (needs [train])"),
    "export": ("export", "export a run or ensemble to ONNX (needs [train])"),
    "models": ("models", "list the registered architectures"),
    "report": ("report", "self-contained HTML report + MODEL_CARD.md from evaluation results"),
    "serve": ("serve", "REST API and web page with heat maps (needs [serve])"),
}

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 1, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bonefrac",
        description="Fracture / no-fracture classification of musculoskeletal radiographs.",
        epilog=DISCLAIMER + " Exit codes: 0 ok, 1 error, 2 usage, 3 some inputs failed.")
    p.add_argument("--version", action="version", version=f"bonefrac {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    except (CLIError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"bonefrac {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # model-file errors and the like, without a traceback
        from bonefrac.inference.ensemble import ModelFileError

        if isinstance(e, ModelFileError | ImportError | OSError):
            print(f"bonefrac {args.command}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
