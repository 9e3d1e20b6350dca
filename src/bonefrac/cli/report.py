"""``bonefrac report``: a self-contained ``report.html`` and ``MODEL_CARD.md``, written beside
the evaluation results they report (``--out``), never into a model folder or the installed
package unless told to in so many words (``--out`` / ``--card``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonefrac.cli.common import CLIError, resolve_model


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="an ensemble folder, a training run folder or a shipped model name "
                        "(ensemble, ensemble-224, baseline), evaluated already")
    # SUPPRESS: no "(default: None)" in --help; the real defaults are stated in the text
    p.add_argument("--results", default=argparse.SUPPRESS, metavar="DIR",
                   help="evaluation results to report (a `bonefrac evaluate --out` folder); "
                        "MODEL_DIR/Results when not given")
    p.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                   help="where report.html and MODEL_CARD.md go; default: the results folder")
    p.add_argument("--card", default=argparse.SUPPRESS, metavar="FILE",
                   help="write the model card here instead, e.g. MODEL_DIR/MODEL_CARD.md when "
                        "shipping a model (a model folder is written only when asked)")
    p.add_argument("--data", default=argparse.SUPPRESS, metavar="DIR",
                   help="the training data folder, for the model card's data section; the "
                        "folder recorded in the model (if it exists here) when not given")
    p.add_argument("--no-card", action="store_true", help="write report.html only")


def write_reports(model: str | Path, results: str | Path | None = None, *,
                  out: str | Path | None = None, card: str | Path | None = None,
                  data: str | Path | None = None, with_card: bool = True) -> list[Path]:
    """Write ``report.html`` (and ``MODEL_CARD.md`` unless ``with_card`` is False) of
    ``model``'s evaluation ``results`` into ``out`` (default: the results folder); return the
    paths written. Notes and warnings go to stderr. Refuses to write inside the installed
    package unless ``out`` / ``card`` name the place."""
    from bonefrac.evaluation.evaluate import inside_package
    from bonefrac.evaluation.html_report import write_html_report
    from bonefrac.evaluation.model_card import load_inputs, write_model_card

    inp = load_inputs(resolve_model(model, "MODEL_DIR"), results, data)
    folder = Path(out) if out else inp.results_dir
    if out is None and inside_package(folder):
        raise CLIError(f"{folder} is inside the installed bonefrac package (a shipped "
                       f"model's results: its report is {folder / 'report.html'}); pass --out "
                       "DIR to write a new one elsewhere")
    if inp.data is not None and not inp.data.found:
        print(f"note: training data folder {inp.data.path} not found here; the model card "
              "describes it from the model's records only (pass --data DIR)", file=sys.stderr)
    html, warnings = write_html_report(inp, folder / "report.html")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    written = [html]
    if with_card:
        written.append(write_model_card(inp, Path(card) if card else folder / "MODEL_CARD.md"))
    return written


def run(args) -> int:
    for path in write_reports(args.model_dir, getattr(args, "results", None),
                              out=getattr(args, "out", None), card=getattr(args, "card", None),
                              data=getattr(args, "data", None), with_card=not args.no_card):
        print(f"wrote {path}")
    return 0
