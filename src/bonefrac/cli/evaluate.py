"""``bonefrac evaluate``: full metrics with CIs on a labelled folder, then (unless
``--no-report``) ``report.html`` and ``MODEL_CARD.md`` beside them, as ``bonefrac report``
writes them."""

from __future__ import annotations

import argparse
import sys

from bonefrac import CLASSES
from bonefrac.cli.common import (
    add_model_arg,
    input_folder,
    load_index_args,
    resolve_model,
    torch_note,
)
from bonefrac.cli.extras import require_dicom_for, require_extra

# --split values: the manifest's own word for validation ("valid") means "val"
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
          "all": "all"}


def _split(value: str) -> str:
    try:
        return SPLITS[value.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected train, val (or valid), test or "
                                         "all") from None


def add_arguments(p) -> None:
    add_model_arg(p)
    p.add_argument("--data", required=True, help=f"folder with {CLASSES[1]}/ and {CLASSES[0]}/")
    p.add_argument("--split", default="test", type=_split, metavar="{train,val,valid,test,all}",
                   help="which split (valid = val, the manifest's word); 'all' = external "
                        "validation: every image is test")
    p.add_argument("--out", default=None,
                   help="results folder; default: MODEL/Results, or Results/<model folder "
                        "name> in the working directory for a shipped model (the package "
                        "is never written to)")
    p.add_argument("--no-report", action="store_true",
                   help="skip report.html and MODEL_CARD.md (write them later with "
                        "`bonefrac report`)")
    p.add_argument("--refit-threshold", action="store_true",
                   help="re-tune the threshold on the evaluated data (stated in the note)")
    p.add_argument("--subgroup", default=None, metavar="COLUMN",
                   help="also report metrics per value of this manifest/groups.csv column; "
                        "default: none")
    p.add_argument("--compare-with", default=None, metavar="MODEL",
                   help="also run this model (folder or short name) on the same images and "
                        "add both, side by side, to comparison.md; default: none")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"],
                   help="onnx: ONNX Runtime; torch: PyTorch (needs [train]); auto: ONNX where "
                        "the model has an export, else torch")


def ci_text(entry: dict, digits: int = 3) -> str:
    """``0.925 [0.885, 0.960]`` of one metric entry (value and its 95% CI); ``n/a`` for what
    the data cannot estimate (one class only: None or NaN)."""
    from bonefrac.evaluation.model_card import fmt

    lo, hi = (entry.get("ci95") or [None, None])[:2]
    return f"{fmt(entry.get('value'), digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def run(args) -> int:
    split = args.split
    input_folder(args.data, "--data")
    require_extra("eval", "evaluate")  # the plots and the report need them: fail in ms, not after
    if args.backend == "torch":
        require_extra("train", "evaluate --backend torch")
    require_dicom_for([args.data], "evaluate")
    root = resolve_model(args.model)
    other = resolve_model(args.compare_with, "--compare-with") if args.compare_with else None
    note = torch_note(root, args.backend)
    if note:
        print(note, file=sys.stderr)
    from bonefrac.evaluation.evaluate import default_results_dir, evaluate_model

    out = args.out or default_results_dir(root)
    all_test = split == "all"
    index = load_index_args(args, all_test=all_test)
    res = evaluate_model(root, index, split="test" if all_test else split, out=out,
                         refit_threshold=args.refit_threshold, subgroup=args.subgroup,
                         backend=args.backend, compare_with=other)
    m = res["metrics"]
    print(f"{res['model_id']} on {res['split']} (n={res['n']}) at t={res['threshold']:.4f}: "
          f"AUC {ci_text(m['roc_auc'])}, sensitivity {ci_text(m['sensitivity'])}, "
          f"specificity {ci_text(m['specificity'])} (95% CIs)")
    print(f"results -> {out}/ (metrics.json, clinical_metrics*.txt, plots)")
    if args.no_report:
        print(f"report: bonefrac report {root} --results {out}")
        return 0
    from bonefrac.cli.report import write_reports

    for path in write_reports(root, out, out=out):
        print(f"wrote {path}")
    return 0
