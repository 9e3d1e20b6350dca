"""``bonefrac predict --shard K/N`` + ``bonefrac merge-predictions`` == one unsharded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import EXAMPLES, real_images

from bonefrac.cli.main import main
from bonefrac.inference.predict import collect_inputs, select_shard
from bonefrac.inference.sharding import ShardError, shard_from_env


def _run(*args) -> int:
    return main([*map(str, args)])


def _json(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The 28 real radiographs in two subfolders, plus one unreadable file."""
    d = tmp_path_factory.mktemp("data") / "xrays"
    for f in real_images():
        (d / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.parent.name / f.name)
    (d / "fractured" / "broken.jpg").write_bytes(real_images(1)[0].read_bytes()[:400])
    return d


@pytest.fixture(scope="module")
def sharded(folder, tiny_ensemble, tmp_path_factory) -> tuple[Path, list[Path]]:
    """(unsharded output, [output of shard 1/3, 2/3, 3/3])."""
    base = tmp_path_factory.mktemp("runs")
    assert _run("predict", folder, "--model", tiny_ensemble, "--out", base / "all", "--quiet") == 3
    shards = []
    for k in (1, 2, 3):
        out = base / f"shard{k}"
        rc = _run("predict", folder, "--model", tiny_ensemble, "--out", out, "--shard", f"{k}/3",
                  "--quiet")
        assert rc in (0, 3)
        shards.append(out)
    return base / "all", shards


def test_shards_partition_the_files(sharded):
    full, shards = sharded
    files = [r["file"] for r in _json(full)["predictions"] + _json(full)["errors"]]
    parts = [[r["file"] for r in _json(s)["predictions"] + _json(s)["errors"]] for s in shards]
    assert sorted(f for p in parts for f in p) == sorted(files)  # each file exactly once
    assert all(p for p in parts)  # 29 files: no shard is empty
    assert [_json(s)["shard"] for s in shards] == ["1/3", "2/3", "3/3"]


def test_merged_shards_equal_the_unsharded_run(sharded, folder, tmp_path, capsys):
    full, shards = sharded
    merged = tmp_path / "merged"
    assert _run("merge-predictions", *shards, "--out", merged, "--expected", folder) == 3
    a, b = _json(merged), _json(full)
    assert a["predictions"] == b["predictions"]
    assert a["errors"] == b["errors"] and len(a["errors"]) == 1
    assert (merged / "predictions.csv").read_text() == (full / "predictions.csv").read_text()
    assert (merged / "errors.csv").read_text() == (full / "errors.csv").read_text()
    for k in ("model_id", "model_fingerprint", "threshold", "fusion_weights", "complete"):
        assert a[k] == b[k]
    assert "merged 3 shard(s)" in capsys.readouterr().out


def test_shard_split_ignores_where_the_data_is_mounted(folder, tmp_path):
    moved = tmp_path / "elsewhere" / "mount"
    shutil.copytree(folder, moved)
    for k in (1, 2, 3):
        a = [f.relative_to(folder) for f in select_shard(collect_inputs([folder])[0], k, 3)]
        b = [f.relative_to(moved) for f in select_shard(collect_inputs([moved])[0], k, 3)]
        assert a == b


def test_merge_reports_files_missing_from_every_shard(sharded, folder, tmp_path, capsys):
    _, shards = sharded
    expected = tmp_path / "expected.txt"
    names = [r["file"] for s in shards for r in _json(s)["predictions"]]
    expected.write_text("\n".join(names + [str(folder / "never_predicted.jpg")]) + "\n")
    out = tmp_path / "m"
    assert _run("merge-predictions", *shards, "--out", out, "--expected", expected) == 3
    errors = {e["file"]: e["reason"] for e in _json(out)["errors"]}
    assert errors[str(folder / "never_predicted.jpg")] == "missing from every shard"
    assert "never_predicted.jpg" in capsys.readouterr().err


def _copy_shard(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    data = _json(dst)
    data.update(changes)
    (dst / "predictions.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("case, message", [
    ("duplicate", "given more than once"),
    ("overlap", "appear in more than one shard"),
    ("missing_shard", "shard(s) 3/3 missing"),
    ("other_model", "used another model"),
    ("unfinished", "unfinished shard"),
])
def test_merge_refuses_inconsistent_shards(sharded, tmp_path, capsys, case, message):
    _, (s1, s2, s3) = sharded
    shards = {
        "duplicate": lambda: [s1, s1, s2, s3],
        "overlap": lambda: [s1, s2, s3, _copy_shard(s1, tmp_path / "copy", shard=None)],
        "missing_shard": lambda: [s1, s2],
        "other_model": lambda: [s1, s2, _copy_shard(s3, tmp_path / "s3",
                                                    model_fingerprint="0" * 64)],
        "unfinished": lambda: [s1, s2, _copy_shard(s3, tmp_path / "s3", complete=False)],
    }[case]()
    out = tmp_path / "merged"
    assert _run("merge-predictions", *shards, "--out", out) == 1
    assert message in capsys.readouterr().err
    assert not (out / "predictions.json").exists()


# ------------------------------------------------------------------------- --shard auto
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT",
                  "SLURM_ARRAY_TASK_STEP", "JOB_COMPLETION_INDEX")


@pytest.fixture
def no_scheduler(monkeypatch):
    for v in SCHEDULER_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, count, expected", [
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, None, (1, 8)),
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"},
     None, (8, 8)),
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "4"}, 4, (4, 4)),
    ({"JOB_COMPLETION_INDEX": "2"}, 5, (3, 5)),
])
def test_auto_shard_from_the_scheduler(no_scheduler, env, count, expected):
    for k, v in env.items():
        no_scheduler.setenv(k, v)
    shard = shard_from_env(count=count)
    assert (shard.k, shard.n) == expected


@pytest.mark.parametrize("env, count, message", [
    ({}, None, "neither SLURM_ARRAY_TASK_ID"),
    ({"JOB_COMPLETION_INDEX": "0"}, None, "needs --shard-count"),
    ({"JOB_COMPLETION_INDEX": "5"}, 5, "need 1 <= K <= N"),
    ({"SLURM_ARRAY_TASK_ID": "1"}, None, "SLURM_ARRAY_TASK_COUNT is not"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, 3, "differs"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, None, "not an integer"),
])
def test_auto_shard_refuses_what_it_cannot_use(no_scheduler, env, count, message):
    for k, v in env.items():
        no_scheduler.setenv(k, v)
    with pytest.raises(ShardError, match=message):
        shard_from_env(count=count)


def test_predict_shard_auto_under_slurm_equals_the_explicit_shard(no_scheduler, tmp_path):
    no_scheduler.setenv("SLURM_ARRAY_TASK_ID", "2")
    no_scheduler.setenv("SLURM_ARRAY_TASK_MIN", "1")
    no_scheduler.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert _run("predict", EXAMPLES, "--out", tmp_path / "auto", "--shard", "auto",
                "--quiet") in (0, 3)
    assert _run("predict", EXAMPLES, "--out", tmp_path / "k", "--shard", "2/3", "--quiet") in (0, 3)
    auto, explicit = _json(tmp_path / "auto"), _json(tmp_path / "k")
    assert auto["shard"] == "2/3" and auto["predictions"] == explicit["predictions"]


def test_predict_shard_auto_without_a_scheduler_is_one_line(no_scheduler, tmp_path, capsys):
    assert _run("predict", EXAMPLES, "--out", tmp_path, "--shard", "auto") == 1
    err = capsys.readouterr().err
    assert "JOB_COMPLETION_INDEX" in err and "Traceback" not in err
    assert not (tmp_path / "predictions.json").exists()
