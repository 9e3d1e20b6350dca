"""``bonefrac predict``: P(fracture) per image with the shipped ensemble (ONNX, no torch).

Outputs in ``--out``: ``predictions.csv``, ``predictions.json`` (rows + model header) and
``errors.csv`` (file, reason). They are rewritten atomically after the first batch and then every
few seconds, and once more on SIGINT/SIGTERM, so an interrupted run leaves valid files marked
``"complete": false``; ``--resume`` then predicts only the files missing from them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from bonefrac import CLASSES, DISCLAIMER, BonefracError
from bonefrac.cli.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    CLIError,
    add_model_arg,
    check_writable,
    resolve_model,
    torch_note,
)
from bonefrac.cli.extras import require_dicom_for, require_extra
from bonefrac.data.isolation import default_pool
from bonefrac.inference.columns import SCHEMA_NAME
from bonefrac.inference.domain import UNCERTAIN
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.operating_points import UnknownOperatingPoint
from bonefrac.inference.predict import (
    DEFAULT_POINT,
    iter_predictions,
    model_info,
    progress_bar,
)
from bonefrac.inference.sharding import (
    Checkpoint,
    RunPlan,
    Shard,
    ShardError,
    parse_shard,
    plan_files,
    resume_rows,
    shard_from_env,
)

AUTO = "auto"


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _shard_arg(value: str) -> Shard | str:
    """``K/N`` or ``auto``; anything else is a usage error (exit 2)."""
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        return parse_shard(value)
    except ShardError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="image/DICOM files and/or folders (recursive)")
    add_model_arg(p)
    p.add_argument("--out", default="inference_outputs", help="output folder")
    p.add_argument("--explain", action="store_true",
                   help="also write heat-map overlays to OUT/heatmaps/: the model's own map "
                        "(the shipped ensemble: its trained fracture map; ensemble-224 and "
                        "baseline: Grad-CAM), its box and peak, a colour bar and the decision")
    p.add_argument("--resume", action="store_true",
                   help="keep the predictions already in OUT/predictions.json (same model "
                        "required) and predict only the remaining files")
    p.add_argument("--shard", type=_shard_arg, default=argparse.SUPPRESS, metavar="K/N|auto",
                   help="predict only shard K of N (1-based): a file belongs to shard "
                        "1 + sha1(its path relative to the input folder, or its name if given "
                        "directly) mod N, the same on every machine; join the shards with "
                        "`bonefrac merge-predictions`. 'auto': K and N from a SLURM job array "
                        "(SLURM_ARRAY_TASK_ID, _MIN, _COUNT) or a Kubernetes Indexed Job "
                        "(JOB_COMPLETION_INDEX with --shard-count)")
    p.add_argument("--shard-count", type=_positive, default=argparse.SUPPRESS, metavar="N",
                   help="with --shard auto: the number of shards, required on Kubernetes (the "
                        "Job's completions); under SLURM it must equal SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--batch-size", type=_positive, default=8,
                   help="images per batch (8 is fastest per image on CPU; larger batches "
                        "fall out of cache)")
    p.add_argument("--workers", type=_positive, default=argparse.SUPPRESS,
                   help="batches predicted at once (default: one per CPU; 1 with --backend "
                        "torch, which threads internally)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="ONNX Runtime threads per batch (parallelism comes from --workers)")
    p.add_argument("--operating-point", default=DEFAULT_POINT,
                   choices=[DEFAULT_POINT, "triage", "confirmation"],
                   help="which threshold drives `decision` (and the `threshold` column): the "
                        "model's default threshold, triage (sensitivity >= 0.95 on validation) "
                        "or confirmation (specificity >= 0.90 on validation); every point's "
                        "decision is also in its own decision_<name> column")
    p.add_argument("--no-gate", action="store_true",
                   help="keep the model's decision for images the input-domain gate flags "
                        "(colour, smaller than 100 px, blank, aspect > 5:1, a DICOM modality "
                        "or body part outside the training data, domain_score > 1); they "
                        "still carry domain_score and the warning. Default: such rows get "
                        "decision 'uncertain'")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"],
                   help="onnx: ONNX Runtime, no torch; torch: PyTorch (needs [train]); auto: "
                        "ONNX where the model has an export, else torch")
    p.add_argument("--by-study", action="store_true",
                   help="also write OUT/studies.csv and studies.json: one row per DICOM study "
                        "(Study Instance UID), P = the max over its images, fractured at a "
                        "point when any image is; non-DICOM files belong to no study")
    p.add_argument("--study-ids", action="store_true",
                   help="with --by-study: also write each study's AccessionNumber and "
                        "PatientID (columns accession_number, patient_id). Off by default: "
                        "they identify patients; use only where your approval allows it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class Interrupted(BonefracError):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def resolve_shard(args) -> Shard | None:
    """The ``--shard`` value, with ``auto`` read from the scheduler's environment."""
    shard = getattr(args, "shard", None)
    count = getattr(args, "shard_count", None)
    if shard == AUTO:
        shard = shard_from_env(os.environ, count)
        print(f"shard {shard} (from {shard.source})", file=sys.stderr)
    elif count is not None:
        raise CLIError("--shard-count goes with --shard auto (with --shard K/N, N is the count)")
    return shard


def check_inputs(plan: RunPlan, inputs: list[str], shard: Shard | None) -> None:
    """Refuse a run with nothing to predict, before anything is written: every input
    missing (a typo: exit 1, not an errors.csv of it), or folders without images."""
    if plan.missing and not plan.files:
        gone = [e["file"] for e in plan.missing]
        raise CLIError(f"{', '.join(gone)} {'does' if len(gone) == 1 else 'do'} not exist "
                       "(give image or DICOM files, or folders of them)")
    if not plan.files and not plan.missing:
        raise CLIError("no image files found in " + ", ".join(map(str, inputs))
                       + (f" for shard {shard}" if shard else ""))


def run(args) -> int:
    # Everything that can fail for the whole run is checked before any image is touched.
    out = Path(args.out)
    shard = resolve_shard(args)
    if args.study_ids and not args.by_study:
        raise CLIError("--study-ids goes with --by-study (it adds columns to studies.csv)")
    if shard and args.by_study:
        raise CLIError("--by-study needs every image of a study in one run; it cannot be "
                       "combined with --shard")
    plan = plan_files(args.inputs, [out], shard)
    check_inputs(plan, args.inputs, shard)  # before check_writable creates OUT
    check_writable(out)
    if args.backend == "torch":
        require_extra("train", "predict --backend torch")
    root = resolve_model(args.model)
    note = torch_note(root, args.backend)
    if note:
        print(note, file=sys.stderr)
    default_pool().prestart()  # the first decode worker boots while the model loads
    ens = Ensemble.load(root, backend=args.backend, threads=args.threads)
    ens.gate_enabled = not args.no_gate
    if ens.gate_note:  # the learned check is off for this model: say so before any work
        print(f"note: {ens.gate_note}", file=sys.stderr)
    point = args.operating_point
    try:
        ens.points.check(point)
    except UnknownOperatingPoint as e:
        raise CLIError(f"--operating-point {point}: model {ens.model_id}: {e}") from None
    info = model_info(ens, point)
    require_dicom_for(plan.files, "predict")
    if args.resume and (out / "predictions.json").exists():
        plan.done = resume_rows(out, info, plan.files)
        print(f"resuming: {len(plan.done)} of {len(plan.files)} image(s) already predicted "
              f"in {out}/", file=sys.stderr)
    extra = {"backend": args.backend, "shard": str(shard) if shard else None,
             "n_inputs": len(plan.files)}
    todo = plan.todo
    ckpt = Checkpoint(out, info, plan.done, plan.missing, len(todo), extra)
    interrupted = _predict_into(ckpt, ens, todo, args, out)
    ckpt.write()
    if args.by_study and not interrupted:
        _write_studies(out, ckpt, plan.files, info, args.study_ids)
    return _report(ckpt, plan, out, interrupted)


def _write_studies(out: Path, ckpt: Checkpoint, files: list[Path], info: dict,
                   with_ids: bool = False) -> None:
    """``--by-study``: the study rows (rule in :mod:`bonefrac.inference.study`), with the
    patient identifiers when ``--study-ids`` asked for them."""
    from bonefrac.inference.study import studies_of, study_ids, study_rows, write_studies

    studies = study_rows(ckpt.res.rows, studies_of(files),
                         study_ids(files) if with_ids else None)
    write_studies(out, studies, info)
    print(f"{len(studies)} DICOM stud{'y' if len(studies) == 1 else 'ies'} -> {out}/studies.csv",
          file=sys.stderr)


def _predict_into(ckpt: Checkpoint, ens, todo: list[Path], args, out: Path
                  ) -> Interrupted | None:
    """Predict ``todo`` into the checkpoint. SIGTERM (and Ctrl-C) become an exception in the
    main thread: the batches in flight are cancelled or finished and the signal is returned,
    so that the caller writes the outputs one last time, marked incomplete."""
    workers = getattr(args, "workers", None) or (1 if args.backend == "torch" else None)
    handlers = ({s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        with progress_bar(len(todo), not args.quiet) as bar:
            preds = iter_predictions(ens, todo, batch_size=args.batch_size, workers=workers,
                                     explain=args.explain, heatmap_dir=out / "heatmaps",
                                     point=args.operating_point)
            try:
                for n_files, rows, errors in preds:
                    ckpt.add(n_files, rows, errors)
                    bar.update(n_files)
            finally:
                preds.close()  # cancel queued batches, wait for the running ones
    except Interrupted as e:
        return e
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return None


def _report(ckpt: Checkpoint, plan: RunPlan, out: Path, interrupted: Interrupted | None) -> int:
    res, n = ckpt.res, len(plan.files)
    if interrupted:
        print(f"interrupted by {interrupted}: {n - ckpt.pending} of {n} "
              f"image(s) done; partial results in {out}/ (run again with --resume to finish)",
              file=sys.stderr)
        return 128 + interrupted.signum
    for e in res.errors:  # one line per bad file, as in errors.csv
        print(f"error: {e['file']}: {e['reason']}", file=sys.stderr)
    print("\n".join(summary_lines(res.rows, res.errors, out)))
    print(DISCLAIMER)
    return EXIT_PARTIAL if res.errors else EXIT_OK


def summary_lines(rows: list[dict], errors: list[dict], out: Path) -> list[str]:
    """The run summary: how many images got each decision, how many failed, and where the
    predictions, their column guide, the errors and the overlays are."""
    counts = Counter(r.get("decision") for r in rows)
    decided = ", ".join(f"{counts[d]} {d}" for d in (CLASSES[1], CLASSES[0], UNCERTAIN))
    lines = [f"{len(rows) + len(errors)} image(s): {decided}; {len(errors)} failed",
             f"predictions: {out}/predictions.csv (and predictions.json; columns explained "
             f"in {out}/{SCHEMA_NAME})",
             f"detections:  {out}/detections.csv (every scored box: file, rank, score, x0, "
             "y0, x1, y1)",
             f"errors:      {out}/errors.csv" + (f" ({len(errors)} file(s), one reason each)"
                                                  if errors else " (none)")]
    overlays = sum(bool(r.get("heatmap")) for r in rows)
    if overlays:
        lines.append(f"overlays:    {out}/heatmaps/ ({overlays} PNG)")
    return lines
