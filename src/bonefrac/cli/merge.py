"""``bonefrac merge-predictions``: join the outputs of ``bonefrac predict --shard K/N`` runs.

Checks before writing anything: every shard finished (``"complete": true``), all shards used the
same model (id and fingerprint), the shards are distinct parts of one K/N split, and no file
appears twice. With ``--expected`` (a folder, as given to ``predict``, or a text file with one
path per line) files that no shard mentions are reported and listed in ``errors.csv``.
The merged rows are in the order a single unsharded run writes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.cli.common import EXIT_OK, EXIT_PARTIAL, CLIError, check_writable
from bonefrac.inference.predict import read_predictions
from bonefrac.inference.sharding import expected_files, merge_shards, shown, write_merged


def add_arguments(p) -> None:
    p.add_argument("shards", nargs="+", metavar="SHARD_DIR",
                   help="output folders of `bonefrac predict --shard K/N` runs")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="folder for the merged outputs")
    p.add_argument("--expected", default=argparse.SUPPRESS, metavar="DIR_OR_LIST",
                   help="the input folder given to predict, or a text file listing the "
                        "expected files one per line: files absent from every shard are "
                        "reported as errors")


def run(args) -> int:
    out = Path(args.out)
    if any(Path(s).resolve() == out.resolve() for s in args.shards):
        raise CLIError("--out must not be one of the shard folders")
    # Unreadable shards or lists and inconsistent shards raise on purpose: one line each.
    shards = [read_predictions(s) for s in args.shards]
    spec = getattr(args, "expected", None)
    expected = expected_files(spec) if spec else None
    merged, missing = merge_shards(shards, list(args.shards), expected)
    check_writable(out)
    res = write_merged(out, merged)
    if missing:
        print(f"missing from every shard: {len(missing)} file(s): {shown(missing)}",
              file=sys.stderr)
    print(f"merged {len(args.shards)} shard(s): {len(res.rows)} prediction(s), "
          f"{len(res.errors)} error(s) -> {out}/predictions.csv")
    print(DISCLAIMER)
    return EXIT_PARTIAL if res.errors else EXIT_OK
