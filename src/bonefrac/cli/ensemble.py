"""``bonefrac ensemble fit``: weighted probability fusion of trained runs."""

from __future__ import annotations

from bonefrac.cli.common import add_policy_arg, load_index_args, resolve_model
from bonefrac.cli.extras import require_dicom_for, require_extra


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = sub.add_parser("fit", formatter_class=p.formatter_class,
                       help="fit calibration, fusion weights and threshold on the "
                            "VALIDATION split, export ONNX, evaluate on test")
    f.add_argument("--members", nargs="+", required=True, metavar="RUN",
                   help="trained run folders; the first is the baseline for comparison.md")
    f.add_argument("--data", required=True,
                   help="the labelled folder the members were trained on (its validation "
                        "split fits temperatures, weights and thresholds)")
    f.add_argument("--out", required=True, help="ensemble folder to write")
    f.add_argument("--fit-weights", nargs="?", const="logloss", default=None,
                   choices=["logloss", "auc"],
                   help="grid-search the fusion weights on validation (default: equal)")
    f.add_argument("--model-id", default=None,
                   help="the ensemble's model_id; default: bonefrac-MEMBER+MEMBER")
    f.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    add_policy_arg(f)
    g = sub.add_parser("gate", formatter_class=p.formatter_class,
                       help="(re)fit only the input-domain gate of an ensemble folder: "
                            "pooled features of the TRAINING split, limits at the 99.5th "
                            "percentile of VALIDATION (what `ensemble fit` does at its end)")
    g.add_argument("--model", required=True, help="ensemble folder (ensemble_meta.json)")
    g.add_argument("--data", required=True,
                   help="the labelled folder the model was trained on (train and val splits)")


def run(args) -> int:
    if args.action == "gate":
        return _run_gate(args)
    require_extra("train", "ensemble fit")
    require_dicom_for([args.data], "ensemble fit")
    from bonefrac.training.fit import fit_ensemble

    index = load_index_args(args)
    res = fit_ensemble(args.members, index, args.out, fit_weights=args.fit_weights,
                       policy=args.threshold_policy, model_id=args.model_id,
                       export_onnx=not args.no_onnx)
    print(res["comparison"]["claim"])
    m = res["metrics"]
    print(f"ensemble test AUC {m['roc_auc']['value']:.4f}, sensitivity "
          f"{m['sensitivity']['value']:.3f}, specificity {m['specificity']['value']:.3f}")
    return 0


def _run_gate(args) -> int:
    require_extra("eval", "ensemble gate")  # scikit-learn (PCA, Ledoit-Wolf); no torch
    require_dicom_for([args.data], "ensemble gate")
    from bonefrac.evaluation.domain_fit import fit_folder_gate

    entry = fit_folder_gate(resolve_model(args.model), load_index_args(args))
    if "skipped" in entry:
        print(f"no domain gate: {entry['skipped']}")
        return 0
    print(f"domain gate -> {entry['file']} (sha256 {entry['sha256'][:16]}...): {entry['how']}; "
          f"training images above the threshold: {float(entry['train_flagged']):.1%}")
    return 0
