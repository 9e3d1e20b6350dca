"""``bonefrac evaluate``: full metrics with CIs on a labelled folder."""

from __future__ import annotations

from bonefrac import CLASSES
from bonefrac.cli.common import add_model_arg, load_index_args, resolve_model
from bonefrac.cli.extras import require_dicom_for, require_extra


def add_arguments(p) -> None:
    add_model_arg(p)
    p.add_argument("--data", required=True, help=f"folder with {CLASSES[1]}/ and {CLASSES[0]}/")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which split; 'all' = external validation: every image is test")
    p.add_argument("--out", default=None, help="Results folder (default: MODEL/Results)")
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


def run(args) -> int:
    require_extra("eval", "evaluate")  # the plots and the report need them: fail in ms, not after
    if args.backend == "torch":
        require_extra("train", "evaluate --backend torch")
    require_dicom_for([args.data], "evaluate")
    from bonefrac.evaluation.evaluate import evaluate_model

    all_test = args.split == "all"
    index = load_index_args(args, all_test=all_test)
    res = evaluate_model(resolve_model(args.model), index, split="test" if all_test
                         else args.split, out=args.out, refit_threshold=args.refit_threshold,
                         subgroup=args.subgroup, backend=args.backend,
                         compare_with=resolve_model(args.compare_with) if args.compare_with
                         else None)
    m = res["metrics"]
    print(f"{res['model_id']} on {res['split']} (n={res['n']}): "
          f"AUC {m['roc_auc']['value']:.4f} {m['roc_auc']['ci95']}, "
          f"sensitivity {m['sensitivity']['value']:.3f}, "
          f"specificity {m['specificity']['value']:.3f} at t={res['threshold']:.4f}")
    return 0
