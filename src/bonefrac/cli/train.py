"""``bonefrac train``: two-stage transfer learning of one member.

The hyper-parameter options come from :class:`~bonefrac.training.config.TrainConfig`'s fields
(their ``metadata``: help, flag, choices, converters); only the options that are not
hyper-parameters (where the data and run live, resuming, the device) are written out here.
"""

from __future__ import annotations

import dataclasses
import typing

from bonefrac import CLASSES
from bonefrac.cli.extras import require_dicom_for, require_extra


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help=f"folder with {CLASSES[1]}/ and {CLASSES[0]}/")
    p.add_argument("--out", required=True, help="run folder to create, e.g. runs/mnv2")
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (bf16 autocast, channels-last), else CPU. "
                        "Multi-process / multi-node: launch with torchrun --nproc-per-node N "
                        "-m bonefrac train ...; --batch-size is then the global batch")


def _config_fields():
    """(field, resolved annotation) for each field of TrainConfig."""
    from bonefrac.training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _value_type(name: str, hint) -> tuple[type | None, str | None]:
    """(argparse ``type``, ``nargs``) for an annotation: ``X | None`` parses as X,
    ``tuple[X, ...]`` as any number of X; strings stay as argparse gives them."""
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], "*"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if len(args) == 1 else hint
    if hint in (int, float):
        return hint, None
    if hint is str:
        return None, None
    raise TypeError(f"TrainConfig.{name}: no command-line parsing for {hint!r}; give the "
                    "field choices and a parse converter")


def add_config_arguments(p) -> None:
    """One option per TrainConfig field: ``--`` + the name with dashes unless the field's
    metadata names a ``flag``; its default (through ``show``), help, choices and type."""
    for f, hint in _config_fields():
        meta = f.metadata
        typ, nargs = _value_type(f.name, hint) if "choices" not in meta else (None, None)
        default = meta["show"](f.default) if "show" in meta else f.default
        p.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), dest=f.name,
                       type=typ, nargs=nargs, choices=meta.get("choices"), help=meta["help"],
                       default=list(default) if nargs else default)


def config_values(args) -> dict[str, typing.Any]:
    """The TrainConfig keyword arguments the parsed ``args`` give (each field's ``parse``)."""
    out = {}
    for f, hint in _config_fields():
        value = getattr(args, f.name)
        if "parse" in f.metadata and value is not None:
            value = f.metadata["parse"](value)
        out[f.name] = tuple(value) if typing.get_origin(hint) is tuple else value
    return out


def run(args) -> int:
    require_extra("train", "train")
    require_dicom_for([args.data], "train")
    from bonefrac.training import TrainConfig, train
    from bonefrac.training.distributed import teardown

    values = config_values(args)
    if values["arch"] == "efficientnet_b0" and values["weights"] == "imagenet":
        print("note: efficientnet_b0 ImageNet weights ship in no package here; trying "
              "torchvision's download (pass --weights FILE to use your own file).")
    cfg = TrainConfig(**values)
    try:
        train(args.data, args.out, cfg, resume=args.resume, device=args.device)
    finally:
        teardown()  # leave the torchrun process group, if any
    return 0
