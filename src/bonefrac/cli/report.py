"""``bonefrac report``: a self-contained ``Results/report.html`` and ``MODEL_CARD.md``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="an ensemble folder or a training run folder, evaluated already "
                        "(its Results/metrics.json exists)")
    # SUPPRESS: no "(default: None)" in --help; the real defaults are stated in the text
    p.add_argument("--results", default=argparse.SUPPRESS, metavar="DIR",
                   help="evaluation results to report, e.g. the --out folder of an external "
                        "validation; MODEL_DIR/Results when not given")
    p.add_argument("--data", default=argparse.SUPPRESS, metavar="DIR",
                   help="the training data folder, for the model card's data section; the "
                        "folder recorded in the model (if it exists here) when not given")
    p.add_argument("--no-card", action="store_true", help="write report.html only")


def run(args) -> int:
    from bonefrac.evaluation.html_report import write_html_report
    from bonefrac.evaluation.model_card import load_inputs, write_model_card

    inp = load_inputs(args.model_dir, getattr(args, "results", None),
                      getattr(args, "data", None))
    if inp.data is not None and not inp.data.found:
        print(f"note: training data folder {inp.data.path} not found here; the model card "
              "describes it from the model's records only (pass --data DIR)", file=sys.stderr)
    path, warnings = write_html_report(inp)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {path}")
    if not args.no_card:
        print(f"wrote {write_model_card(inp)}")
    return 0
