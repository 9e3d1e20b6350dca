"""Scale-out and restartability of batch prediction: shards, checkpoints, resume and merge.

- **Shards**: ``K/N`` splits the input files by a hash of their path relative to the input
  folder (:func:`bonefrac.inference.predict.shard_index`), the same on every machine. ``auto``
  takes K and N from the scheduler: a SLURM job array or a Kubernetes Indexed Job.
- **Checkpoints**: the outputs are rewritten atomically while a run goes on, marked
  ``"complete": false`` until the end, so an interrupted run leaves valid files.
- **Resume**: the rows of a previous run by the same model (same fingerprint) are kept and only
  the missing files are predicted.
- **Merge**: shards' outputs joined into what one unsharded run writes, after checking that
  they are finished, by one model, and distinct parts of one split.

The command line (``bonefrac predict`` / ``merge-predictions``) only parses, calls and prints.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bonefrac import BonefracError
from bonefrac.inference.predict import (
    PredictResult,
    collect_inputs,
    list_inputs,
    path_sort_key,
    read_predictions,
    select_shard,
    shard_index,
    write_outputs,
)
from bonefrac.utils import display_path

# What must agree between shards for their rows to be one run's.
MODEL_KEYS = ("model_id", "model_fingerprint", "version", "threshold", "operating_points",
              "fusion_weights", "operating_point", "decision_threshold")
MAX_SHOWN = 10


class ShardError(BonefracError, ValueError):
    """A shard specification, environment, resume or merge that cannot be used as given."""


# --------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """Shard ``k`` of ``n``, 1-based; ``source`` says where K and N came from."""

    k: int
    n: int
    source: str = "--shard"

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ShardError(f"shard {self.k}/{self.n} ({self.source}): need 1 <= K <= N")

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def parse_shard(value: str) -> Shard:
    """``"K/N"`` -> :class:`Shard` with 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m:
        raise ShardError(f"expected K/N with 1 <= K <= N, got {value!r}")
    return Shard(int(m[1]), int(m[2]))


def shard_from_env(env: Mapping[str, str] | None = None, count: int | None = None) -> Shard:
    """K/N from the scheduler running this process.

    - SLURM job array (``sbatch --array=0-7``): K = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)
      / SLURM_ARRAY_TASK_STEP + 1, N = SLURM_ARRAY_TASK_COUNT (MIN defaults to 0, STEP to 1).
    - Kubernetes Indexed Job: K = JOB_COMPLETION_INDEX + 1; N is not in the environment, so
      ``count`` (``--shard-count``, the Job's ``completions``) must give it.

    ``count`` given with SLURM must equal the array's task count: a mismatch would leave files
    in no shard. Raises :class:`ShardError` when neither scheduler's variables are set.
    """
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env:
        return _slurm_shard(env, count)
    if "JOB_COMPLETION_INDEX" in env:
        if count is None:
            raise ShardError("--shard auto on Kubernetes (JOB_COMPLETION_INDEX is set) needs "
                             "--shard-count N, the Indexed Job's completions")
        return Shard(_env_int(env, "JOB_COMPLETION_INDEX") + 1, count, "JOB_COMPLETION_INDEX")
    raise ShardError("--shard auto: neither SLURM_ARRAY_TASK_ID (a SLURM job array) nor "
                     "JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set; give --shard K/N")


def _slurm_shard(env: Mapping[str, str], count: int | None) -> Shard:
    task, low = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise ShardError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT "
                         "is not")
    n = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if count is not None and count != n:
        raise ShardError(f"--shard-count {count} differs from SLURM_ARRAY_TASK_COUNT={n}")
    if (task - low) % step:
        raise ShardError(f"SLURM_ARRAY_TASK_ID={task} is not MIN={low} plus a multiple of "
                         f"STEP={step}; use --shard K/N for irregular arrays")
    return Shard((task - low) // step + 1, n, f"SLURM_ARRAY_TASK_ID={task}")


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise ShardError(f"{name}={value!r} is not an integer") from None


# ----------------------------------------------------------------------- planning a run
@dataclass
class RunPlan:
    """What one ``predict`` run does: its files, the missing inputs it reports, and (with
    resume) the rows it keeps from a previous run."""

    files: list[Path]
    missing: list[dict]
    done: list[dict] = field(default_factory=list)

    @property
    def todo(self) -> list[Path]:
        done = {r["file"] for r in self.done}
        return [f for f in self.files if display_path(f) not in done]


def plan_files(inputs: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike],
               shard: Shard | None) -> RunPlan:
    """This run's share of ``inputs`` (all of them without a shard)."""
    pairs, missing = collect_inputs(inputs, exclude=exclude)
    if shard is None:
        return RunPlan([f for f, _ in pairs], missing)
    # A missing input is reported by exactly one shard, so merged shards list it once.
    mine = [e for e in missing if shard_index(Path(e["file"]).name, shard.n) == shard.k - 1]
    return RunPlan(select_shard(pairs, shard.k, shard.n), mine)


def resume_rows(out: Path, info: Mapping, files: Sequence[Path]) -> list[dict]:
    """Rows of ``out/predictions.json`` to keep: those for ``files``, if the same model (the
    fingerprint) made them. No previous file: none. Raises :class:`ShardError` otherwise."""
    if not (out / "predictions.json").exists():
        return []
    try:
        prev = read_predictions(out)
    except ValueError as e:
        raise ShardError(f"cannot resume: {e}") from None
    if prev.get("model_fingerprint") != info["model_fingerprint"]:
        raise ShardError(f"cannot resume: {out}/predictions.json was made by model "
                         f"{prev.get('model_id')!r} ({str(prev.get('model_fingerprint'))[:12]}),"
                         f" not {info['model_id']!r} ({info['model_fingerprint'][:12]}); "
                         "use another --out")
    before, now = (x.get("operating_point") or "default" for x in (prev, info))
    if before != now:
        raise ShardError(f"cannot resume: {out}/predictions.json was made with "
                         f"--operating-point {before}, not {now}; use the same one or another "
                         "--out")
    wanted = {display_path(f) for f in files}
    return [r for r in prev["predictions"] if r.get("file") in wanted]


class Checkpoint:
    """Accumulates rows and rewrites the outputs: after the first batch, then at most every
    ``every_s`` seconds (less often when writing itself gets slow), and at the end."""

    def __init__(self, out: Path, info: dict, done: list[dict], errors: list[dict],
                 pending: int, extra: dict, every_s: float = 2.0):
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
        t = time.monotonic()
        self.res.rows.sort(key=lambda r: path_sort_key(r["file"]))
        self.res.errors.sort(key=lambda r: path_sort_key(r["file"]))
        write_outputs(self.out, self.res, self.info, complete=self.pending == 0,
                      **self.extra, n_pending=self.pending)
        self.last = time.monotonic()
        self.cost = self.last - t


# ---------------------------------------------------------------------------------- merge
def shown(items: Sequence[str]) -> str:
    """At most ``MAX_SHOWN`` items, comma-separated, and how many more."""
    more = f" ... and {len(items) - MAX_SHOWN} more" if len(items) > MAX_SHOWN else ""
    return ", ".join(items[:MAX_SHOWN]) + more


def expected_files(spec: str | os.PathLike) -> list[str]:
    """File names as ``predict`` writes them: a folder is listed as predict lists it, a text
    file gives one path per line (``#`` comments and blank lines skipped)."""
    p = Path(spec)
    if p.is_dir():
        return [display_path(f) for f in list_inputs([p])[0]]
    lines = p.read_text().splitlines()
    return [str(Path(s.strip())) for s in lines if s.strip() and not s.lstrip().startswith("#")]


def merge_shards(shards: list[dict], names: list[str], expected: list[str] | None = None
                 ) -> tuple[dict, list[str]]:
    """Merge loaded ``predictions.json`` objects: ``(merged header + rows, missing files)``.

    Raises:
        ShardError: an unfinished shard, mixed models, inconsistent shard numbers or a file
            predicted by more than one shard.
    """
    _check_finished(shards, names)
    ref = _check_same_model(shards, names)
    _check_split(shards)
    rows = [r for s in shards for r in s["predictions"]]
    errors = [e for s in shards for e in s.get("errors", [])]
    counts = Counter(x["file"] for x in rows + errors)
    dups = sorted(f for f, c in counts.items() if c > 1)
    if dups:
        raise ShardError(f"{len(dups)} file(s) appear in more than one shard: {shown(dups)}")
    missing = [f for f in expected if f not in counts] if expected is not None else []
    errors += [{"file": f, "reason": "missing from every shard"} for f in missing]
    rows.sort(key=lambda r: path_sort_key(r["file"]))
    errors.sort(key=lambda r: path_sort_key(r["file"]))
    merged = {**ref, "rows": rows, "errors": errors,
              "extra": {"backend": shards[0].get("backend"), "shard": None,
                        "n_inputs": len(rows) + len(errors), "n_pending": 0,
                        "merged_from": names}}
    return merged, missing


def write_merged(out: Path, merged: dict) -> PredictResult:
    """Write what :func:`merge_shards` returned as one run's outputs in ``out``."""
    merged = dict(merged)
    res = PredictResult(merged.pop("rows"), merged.pop("errors"))
    extra = merged.pop("extra")
    write_outputs(out, res, merged, complete=True, **extra)
    return res


def _check_finished(shards: list[dict], names: list[str]) -> None:
    unfinished = [n for n, s in zip(names, shards, strict=True) if not s.get("complete")]
    if unfinished:
        raise ShardError(f"unfinished shard(s) {shown(unfinished)}: complete them with "
                         "`bonefrac predict ... --resume`")


def _check_same_model(shards: list[dict], names: list[str]) -> dict:
    ref = {k: shards[0].get(k) for k in MODEL_KEYS}
    for n, s in zip(names, shards, strict=True):
        diff = [k for k in MODEL_KEYS if s.get(k) != ref[k]]
        if diff:
            raise ShardError(f"{n} used another model than {names[0]} ({', '.join(diff)} "
                             f"differ: {s.get('model_id')!r} vs {ref['model_id']!r})")
    return ref


def _check_split(shards: list[dict]) -> None:
    """Shards that say which K/N they are must be all N of one split, each once."""
    specs = [s.get("shard") for s in shards]
    if not all(specs):
        return
    parts = [tuple(map(int, sp.split("/"))) for sp in specs]
    totals = {n for _, n in parts}
    if len(totals) > 1:
        raise ShardError(f"shards come from different splits: {', '.join(specs)}")
    dup = [f"{k}/{n}" for (k, n), c in Counter(parts).items() if c > 1]
    if dup:
        raise ShardError(f"shard(s) {shown(dup)} given more than once")
    n_total = totals.pop()
    absent = [f"{k}/{n_total}" for k in range(1, n_total + 1) if (k, n_total) not in parts]
    if absent:
        raise ShardError(f"shard(s) {shown(absent)} missing")
