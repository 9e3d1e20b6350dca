"""``bonefrac predict``: P(fracture) per image with the shipped ensemble (ONNX, no torch).

Outputs in ``--out``: ``predictions.csv``, ``predictions.json`` (rows + model header) and
``errors.csv`` (file, reason). They are rewritten atomically after the first batch and then every
few seconds, and once more on SIGINT/SIGTERM, so an interrupted run leaves valid files marked
``"complete": false``; ``--resume`` then predicts only the files missing from them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from bonefrac.cli.common import add_model_arg, resolve_model
from bonefrac.utils import display_path


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def parse_shard(value: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, got {value!r}")
    return int(m[1]), int(m[2])


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="image/DICOM files and/or folders (recursive)")
    add_model_arg(p)
    p.add_argument("--out", default="inference_outputs", help="output folder")
    p.add_argument("--explain", action="store_true",
                   help="also write Grad-CAM heat-map overlays to OUT/heatmaps/")
    p.add_argument("--resume", action="store_true",
                   help="keep the predictions already in OUT/predictions.json (same model "
                        "required) and predict only the remaining files")
    p.add_argument("--shard", type=parse_shard, default=argparse.SUPPRESS, metavar="K/N",
                   help="predict only shard K of N (1-based): a file belongs to shard "
                        "1 + sha1(its path relative to the input folder, or its name if given "
                        "directly) mod N, the same on every machine; join the shards with "
                        "`bonefrac merge-predictions`")
    p.add_argument("--batch-size", type=_positive, default=8,
                   help="images per batch (8 is fastest per image on CPU; larger batches "
                        "fall out of cache)")
    p.add_argument("--workers", type=_positive, default=argparse.SUPPRESS,
                   help="batches predicted at once (default: one per CPU; 1 with --backend "
                        "torch, which threads internally)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="ONNX Runtime threads per batch (parallelism comes from --workers)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_writable(out: Path) -> None:
    """Create ``out`` and prove it writable with a real file (``os.access`` lies for root)."""
    from bonefrac.cli.main import CLIError

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".bonefrac-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"output folder {out} is not writable: {e.strerror or e}") from None


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


class Checkpoint:
    """Accumulates rows and rewrites the outputs: after the first batch, then at most every
    ``every_s`` seconds (less often when writing itself gets slow), and at the end."""

    def __init__(self, out: Path, info: dict, done: list[dict], errors: list[dict],
                 pending: int, extra: dict, every_s: float = 2.0):
        from bonefrac.inference.predict import PredictResult

        self.out, self.info, self.extra, self.every_s = out, info, extra, every_s
        self.res = PredictResult(list(done), list(errors))
        self.pending = pending  # files not predicted yet
        self.last: float | None = None  # time of the last write
        self.cost = 0.0  # seconds the last write took

    def add(self, n_files: int, rows: list[dict], errors: list[dict]) -> None:
        self.res.rows += rows
        self.res.errors += errors
        self.pending -= n_files
        now = time.monotonic()
        if self.last is None or now - self.last >= max(self.every_s, 10 * self.cost):
            self.write()

    def write(self) -> None:
        from bonefrac.inference.predict import path_sort_key, write_outputs

        t = time.monotonic()
        self.res.rows.sort(key=lambda r: path_sort_key(r["file"]))
        self.res.errors.sort(key=lambda r: path_sort_key(r["file"]))
        write_outputs(self.out, self.res, self.info, complete=self.pending == 0,
                      **self.extra, n_pending=self.pending)
        self.last = time.monotonic()
        self.cost = self.last - t


def run(args) -> int:
    from bonefrac import DISCLAIMER
    from bonefrac.cli.main import EXIT_OK, EXIT_PARTIAL, CLIError
    from bonefrac.inference.ensemble import Ensemble
    from bonefrac.inference.predict import (
        collect_inputs,
        iter_predictions,
        model_info,
        progress_bar,
        read_predictions,
        select_shard,
        shard_index,
    )

    # Everything that can fail for the whole run is checked before any image is touched.
    out = Path(args.out)
    check_writable(out)
    shard = getattr(args, "shard", None)
    workers = getattr(args, "workers", None) or (1 if args.backend == "torch" else None)
    ens = Ensemble.load(resolve_model(args.model), backend=args.backend, threads=args.threads)
    info = model_info(ens)
    pairs, missing = collect_inputs(args.inputs, exclude=[out])
    if shard:
        k, n = shard
        files = select_shard(pairs, k, n)
        # A missing input is reported by exactly one shard, so merged shards list it once.
        missing = [e for e in missing if shard_index(Path(e["file"]).name, n) == k - 1]
    else:
        files = [f for f, _ in pairs]
    if not files and not missing:
        raise CLIError("no image files found in " + ", ".join(map(str, args.inputs))
                       + (" for shard {}/{}".format(*shard) if shard else ""))
    done: list[dict] = []
    if args.resume and (out / "predictions.json").exists():
        try:
            prev = read_predictions(out)
        except ValueError as e:
            raise CLIError(f"cannot resume: {e}") from None
        if prev.get("model_fingerprint") != info["model_fingerprint"]:
            raise CLIError(f"cannot resume: {out}/predictions.json was made by model "
                           f"{prev.get('model_id')!r} ({str(prev.get('model_fingerprint'))[:12]}),"
                           f" not {info['model_id']!r} ({info['model_fingerprint'][:12]}); "
                           "use another --out")
        wanted = {display_path(f) for f in files}
        done = [r for r in prev["predictions"] if r.get("file") in wanted]
        print(f"resuming: {len(done)} of {len(files)} image(s) already predicted in {out}/",
              file=sys.stderr)
    done_files = {r["file"] for r in done}
    todo = [f for f in files if display_path(f) not in done_files]
    extra = {"backend": args.backend, "shard": "{}/{}".format(*shard) if shard else None,
             "n_inputs": len(files)}
    ckpt = Checkpoint(out, info, done, missing, len(todo), extra)

    # SIGTERM (and Ctrl-C) become an exception in the main thread: the batches in flight are
    # cancelled or finished, then the outputs are written one last time, marked incomplete.
    handlers = ({s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    interrupted = None
    try:
        with progress_bar(len(todo), not args.quiet) as bar:
            preds = iter_predictions(ens, todo, batch_size=args.batch_size, workers=workers,
                                     explain=args.explain, heatmap_dir=out / "heatmaps")
            try:
                for n_files, rows, errors in preds:
                    ckpt.add(n_files, rows, errors)
                    bar.update(n_files)
            finally:
                preds.close()  # cancel queued batches, wait for the running ones
    except Interrupted as e:
        interrupted = e
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    res = ckpt.res
    ckpt.write()
    if interrupted:
        print(f"interrupted by {interrupted}: {len(files) - ckpt.pending} of {len(files)} "
              f"image(s) done; partial results in {out}/ (run again with --resume to finish)",
              file=sys.stderr)
        return 128 + interrupted.signum
    for e in res.errors:  # one line per bad file, as in errors.csv
        print(f"error: {e['file']}: {e['reason']}", file=sys.stderr)
    print(f"{len(res.rows)} image(s) predicted, {len(res.errors)} failed -> {out}/"
          "predictions.csv")
    print(DISCLAIMER)
    return EXIT_PARTIAL if res.errors else EXIT_OK
