"""``bonefrac train``: two-stage transfer learning of one member."""

from __future__ import annotations

from bonefrac.cli.common import add_policy_arg
from bonefrac.cli.extras import require_dicom_for, require_extra


def add_arguments(p) -> None:
    from bonefrac.training.config import TrainConfig

    d = TrainConfig()
    p.add_argument("--data", required=True, help="folder with fractured/ and non_fractured/")
    p.add_argument("--out", required=True, help="run folder to create, e.g. runs/mnv2")
    p.add_argument("--arch", default=d.arch,
                   help="mobilenetv2, efficientnet_lite0 (offline ImageNet weights) or "
                        "efficientnet_b0 (no package ships its ImageNet weights: pass "
                        "--weights FILE, or have network access, or --weights none)")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet', a state-dict FILE (.safetensors / .pth, read without "
                        "pickle), or 'none' for random initialisation")
    p.add_argument("--epochs-frozen", type=int, default=d.epochs_frozen)
    p.add_argument("--epochs-finetune", type=int, default=d.epochs_finetune)
    p.add_argument("--unfreeze-blocks", type=int, default=d.unfreeze_blocks,
                   help="how many top backbone blocks stage 2 fine-tunes")
    p.add_argument("--views", type=int, default=d.views,
                   help="cached views per training image: 1 clean + N-1 augmented; "
                        "fine-tuning epoch e uses view (e-1) mod N")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr-frozen", type=float, default=d.lr_frozen)
    p.add_argument("--lr-finetune", type=float, default=d.lr_finetune)
    p.add_argument("--soup-lrs", type=float, nargs="*", default=list(d.soup_lrs),
                   help="peak rates of further fine-tuning runs from stage 1's weights; the "
                        "model is the average of all runs' weights (a model soup); none: one run")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience")
    p.add_argument("--hidden", type=int, default=d.hidden, help="head's dense width")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most N images per split (smoke tests)")
    p.add_argument("--size", type=int, default=None,
                   help="input size in pixels (square, stretch-resized); default: the "
                        "backbone's own, 224")
    p.add_argument("--loc-weight", type=float, default=d.loc_weight,
                   help="weight of the fracture-map loss when the data set has boxes.csv "
                        "(or --boxes); 0 trains without box supervision")
    p.add_argument("--boxes", default=None,
                   help="a boxes.csv (path,x0,y0,x1,y1 as fractions); default: DATA/boxes.csv "
                        "if present")
    p.add_argument("--init-from", default=None,
                   help="warm start from a trained model: a run folder, an ensemble folder "
                        "(its member of --arch) or a .safetensors file; default: ImageNet")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--bn", choices=("train", "frozen"), default="train" if d.train_bn else "frozen",
                   help="BatchNorm of the fine-tuned blocks: batch statistics (train) or the "
                        "ImageNet statistics (frozen)")
    # Not "--monitor": torchrun's parser would take it for an abbreviation of its own option.
    p.add_argument("--stop-on", default=d.monitor, choices=["val_loss", "val_auc"],
                   help="what early stopping (and the plateau schedule) watch")
    p.add_argument("--schedule", default=d.schedule, choices=["onecycle", "plateau"],
                   help="stage 2's learning-rate schedule")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="cross-entropy label smoothing, 0 to 1 (0 = off)")
    p.add_argument("--ema", type=float, default=d.ema,
                   help="decay of a moving average of the weights, updated every step; "
                        "validation, early stopping and the saved model use it (0 = off)")
    p.add_argument("--mixup", type=float, default=d.mixup,
                   help="mixup's Beta(a, a) parameter a, e.g. 0.2 (0 = off)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (bf16 autocast, channels-last), else CPU. "
                        "Multi-process / multi-node: launch with torchrun --nproc-per-node N "
                        "-m bonefrac train ...; --batch-size is then the global batch")
    add_policy_arg(p)


def run(args) -> int:
    require_extra("train", "train")
    require_dicom_for([args.data], "train")
    from bonefrac.training import TrainConfig, train
    from bonefrac.training.distributed import teardown

    weights = None if args.weights.lower() == "none" else args.weights
    if args.arch == "efficientnet_b0" and weights == "imagenet":
        print("note: efficientnet_b0 ImageNet weights ship in no package here; trying "
              "torchvision's download (pass --weights FILE to use your own file).")
    cfg = TrainConfig(
        arch=args.arch, weights=weights, epochs_frozen=args.epochs_frozen,
        epochs_finetune=args.epochs_finetune, unfreeze_blocks=args.unfreeze_blocks,
        views=args.views, batch_size=args.batch_size, lr_frozen=args.lr_frozen,
        lr_finetune=args.lr_finetune, soup_lrs=tuple(args.soup_lrs), patience=args.patience,
        hidden=args.hidden,
        dropout=args.dropout, seed=args.seed, max_images=args.max_images, size=args.size,
        threshold_policy=args.threshold_policy, train_bn=args.bn == "train", monitor=args.stop_on,
        schedule=args.schedule, label_smoothing=args.label_smoothing, ema=args.ema,
        mixup=args.mixup, loc_weight=args.loc_weight, boxes=args.boxes,
        init_from=args.init_from)
    try:
        train(args.data, args.out, cfg, resume=args.resume, device=args.device)
    finally:
        teardown()  # leave the torchrun process group, if any
    return 0
