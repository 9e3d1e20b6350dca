"""``bonefrac report``: a self-contained ``Results/report.html`` and ``MODEL_CARD.md``."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="an ensemble folder or a training run folder, evaluated already "
                        "(its Results/metrics.json exists)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="evaluation results to report (default: MODEL_DIR/Results), e.g. the "
                        "--out folder of an external validation")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="the training data folder, for the model card's data section "
                        "(default: the folder recorded in the model, if present here)")
    p.add_argument("--no-card", action="store_true", help="write report.html only")


def run(args) -> int:
    from bonefrac.evaluation.html_report import write_html_report
    from bonefrac.evaluation.model_card import load_inputs, write_model_card

    inp = load_inputs(args.model_dir, args.results, args.data)
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
