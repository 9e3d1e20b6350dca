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
from collections import Counter
from pathlib import Path

from bonefrac.utils import display_path

MODEL_KEYS = ("model_id", "model_fingerprint", "version", "threshold", "operating_points",
              "fusion_weights")
MAX_SHOWN = 10


def add_arguments(p) -> None:
    p.add_argument("shards", nargs="+", metavar="SHARD_DIR",
                   help="output folders of `bonefrac predict --shard K/N` runs")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="folder for the merged outputs")
    p.add_argument("--expected", default=argparse.SUPPRESS, metavar="DIR_OR_LIST",
                   help="the input folder given to predict, or a text file listing the "
                        "expected files one per line: files absent from every shard are "
                        "reported as errors")


def _shown(items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else ""
    return ", ".join(items[:MAX_SHOWN]) + more


def expected_files(spec: str) -> list[str]:
    """File names as ``predict`` writes them: a folder is listed as predict lists it."""
    from bonefrac.inference.predict import list_inputs

    p = Path(spec)
    if p.is_dir():
        return [display_path(f) for f in list_inputs([p])[0]]
    lines = p.read_text().splitlines()
    return [str(Path(s.strip())) for s in lines if s.strip() and not s.lstrip().startswith("#")]


def merge_shards(shards: list[dict], names: list[str], expected: list[str] | None = None
                 ) -> tuple[dict, list[str]]:
    """Merge loaded ``predictions.json`` objects: ``(merged header + rows, missing files)``.

    Raises:
        ValueError: an unfinished shard, mixed models, inconsistent shard numbers or a file
            predicted by more than one shard.
    """
    from bonefrac.inference.predict import path_sort_key

    unfinished = [n for n, s in zip(names, shards, strict=True) if not s.get("complete")]
    if unfinished:
        raise ValueError(f"unfinished shard(s) {_shown(unfinished)}: complete them with "
                         "`bonefrac predict ... --resume`")
    ref = {k: shards[0].get(k) for k in MODEL_KEYS}
    for n, s in zip(names, shards, strict=True):
        diff = [k for k in MODEL_KEYS if s.get(k) != ref[k]]
        if diff:
            raise ValueError(f"{n} used another model than {names[0]} ({', '.join(diff)} "
                             f"differ: {s.get('model_id')!r} vs {ref['model_id']!r})")
    specs = [s.get("shard") for s in shards]
    if all(specs):
        parts = [tuple(map(int, sp.split("/"))) for sp in specs]
        totals = {n for _, n in parts}
        if len(totals) > 1:
            raise ValueError(f"shards come from different splits: {', '.join(specs)}")
        dup = [f"{k}/{n}" for (k, n), c in Counter(parts).items() if c > 1]
        if dup:
            raise ValueError(f"shard(s) {_shown(dup)} given more than once")
        n_total = totals.pop()
        absent = [f"{k}/{n_total}" for k in range(1, n_total + 1) if (k, n_total) not in parts]
        if absent:
            raise ValueError(f"shard(s) {_shown(absent)} missing")
    rows = [r for s in shards for r in s["predictions"]]
    errors = [e for s in shards for e in s.get("errors", [])]
    counts = Counter(x["file"] for x in rows + errors)
    dups = sorted(f for f, c in counts.items() if c > 1)
    if dups:
        raise ValueError(f"{len(dups)} file(s) appear in more than one shard: {_shown(dups)}")
    missing = [f for f in expected if f not in counts] if expected is not None else []
    errors += [{"file": f, "reason": "missing from every shard"} for f in missing]
    rows.sort(key=lambda r: path_sort_key(r["file"]))
    errors.sort(key=lambda r: path_sort_key(r["file"]))
    merged = {**ref, "rows": rows, "errors": errors,
              "extra": {"backend": shards[0].get("backend"), "shard": None,
                        "n_inputs": len(rows) + len(errors), "n_pending": 0,
                        "merged_from": names}}
    return merged, missing


def run(args) -> int:
    from bonefrac import DISCLAIMER
    from bonefrac.cli.main import EXIT_OK, EXIT_PARTIAL, CLIError
    from bonefrac.cli.predict import check_writable
    from bonefrac.inference.predict import PredictResult, read_predictions, write_outputs

    out = Path(args.out)
    if any(Path(s).resolve() == out.resolve() for s in args.shards):
        raise CLIError("--out must not be one of the shard folders")
    try:
        shards = [read_predictions(s) for s in args.shards]
        spec = getattr(args, "expected", None)
        expected = expected_files(spec) if spec else None
        merged, missing = merge_shards(shards, list(args.shards), expected)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    check_writable(out)
    res = PredictResult(merged.pop("rows"), merged.pop("errors"))
    extra = merged.pop("extra")
    write_outputs(out, res, merged, complete=True, **extra)
    if missing:
        print(f"missing from every shard: {len(missing)} file(s): {_shown(missing)}",
              file=sys.stderr)
    print(f"merged {len(args.shards)} shard(s): {len(res.rows)} prediction(s), "
          f"{len(res.errors)} error(s) -> {out}/predictions.csv")
    print(DISCLAIMER)
    return EXIT_PARTIAL if res.errors else EXIT_OK
