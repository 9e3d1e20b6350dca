"""``bonefrac adapt``: fine-tune (or only recalibrate) a model on a new site's labelled images."""

from __future__ import annotations

from bonefrac import CLASSES, DISCLAIMER
from bonefrac.cli.common import resolve_model
from bonefrac.cli.extras import require_dicom_for, require_extra


def add_arguments(p) -> None:
    from bonefrac.training.adapt import AdaptConfig

    d = AdaptConfig()
    p.add_argument("--model", default="ensemble",
                   help="the parent: an ensemble folder or a shipped name (ensemble, "
                        "ensemble-224)")
    p.add_argument("--data", required=True,
                   help=f"the site's labelled folder ({CLASSES[1]}/, {CLASSES[0]}/, optional "
                        "manifest.csv with a train/val/test split, boxes.csv); without a "
                        "manifest a stratified split keeps near-duplicates together")
    p.add_argument("--out", required=True, help="folder for the adapted model (new)")
    p.add_argument("--recalibrate-only", action="store_true",
                   help="keep the parent's weights; refit only temperatures, fusion weights, "
                        "thresholds and operating points on the site's validation split "
                        "(pooled with training when validation is small) and the domain gate "
                        "when the site has enough training images, else the parent's is kept "
                        "(no torch: needs the [eval] extra)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="fine-tuning epochs per member (early stopping on validation AUC)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (one-cycle)")
    p.add_argument("--views", type=int, default=d.views,
                   help="cached views per training image (1 clean + N-1 augmented)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per optimisation step")
    p.add_argument("--regroup", action="store_true",
                   help="near-duplicate groups that straddle the manifest's splits: move each "
                        "whole into the split holding most of its images instead of refusing")
    p.add_argument("--model-id", default=None,
                   help="the new model's id; default: PARENT+SITE-adapted")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU")


def run(args) -> int:
    require_extra("eval" if args.recalibrate_only else "train", "adapt")
    require_dicom_for([args.data], "adapt")
    from bonefrac.training.adapt import AdaptConfig, adapt

    cfg = AdaptConfig(epochs=args.epochs, lr=args.lr, views=args.views,
                      batch_size=args.batch_size)
    res = adapt(resolve_model(args.model), args.data, args.out,
                recalibrate_only=args.recalibrate_only, cfg=cfg, model_id=args.model_id,
                device=args.device, regroup=args.regroup)
    print(summary(res, args.out))
    print(DISCLAIMER)
    return 0


def summary(res: dict, out: str) -> str:
    """What was fitted on how many images, what is unreliable, and before/after on the site's
    test split where it has one, from :func:`bonefrac.training.adapt.adapt`."""
    ad = res["adapt"]
    lines = [f"adapted {res['parent']['model_id']} -> {res['model_id']} ({ad['mode']}) on "
             f"{res['site']['n_files']} site images in {res['seconds'] / 60:.1f} min", "fitted:"]
    lines += [f"  {what}: {how}" for what, how in ad["fitted"].items()]
    lines += [f"WARNING: {note}" for note in ad["notes"]]
    if res["evaluation"]:
        lines += _comparison(res["evaluation"])
    lines.append(f"-> {out}/" + (" (Results/comparison.md, Results/metrics.json)"
                                 if res["evaluation"] else ""))
    return "\n".join(lines)


def _comparison(ev: dict) -> list[str]:
    """Parent vs adapted on the test split; a CI of width 0 is not shown as one."""
    cmp = ev["compared_with"]
    new, old = cmp["models"]
    d = cmp["auc_diff"]
    auc_new = ev["metrics"]["roc_auc"]["value"]
    lines = [f"site test split (n={ev['n']}), each model at its own validation threshold:"]
    for name, auc in ((old, auc_new - d["value"]), (new, auc_new)):
        e = cmp["errors"][name]
        lines.append(f"  {name}: AUC {auc:.4f}, false negatives {e['fn']}, false positives "
                     f"{e['fp']}")
    lo, hi = d["ci95"]
    if hi - lo < 1e-9:
        lines.append(f"  AUC difference (adapted - parent): {d['value']:+.4f} in every bootstrap "
                     "resample: both models rank these images alike (recalibration keeps each "
                     "member's ranking), so there is no CI to report; compare the errors above")
    else:
        lines.append(f"  AUC difference (adapted - parent): {d['value']:+.4f}, paired bootstrap "
                     f"95% CI [{lo:+.4f}, {hi:+.4f}]")
    return lines
