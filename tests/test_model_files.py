"""Model files are verified before use and never unpickled.

A member file with one byte changed, or cut short, is refused by ``Ensemble.load`` with a
ModelFileError naming the file and its sha256; ``bonefrac predict`` then exits 1 with one line.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, SHIPPED_BASELINE, SHIPPED_ENSEMBLE, real_images

from bonefrac.inference import Ensemble, ModelFileError
from bonefrac.utils import write_json


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def member_files(model: Path, key: str) -> list[Path]:
    meta = json.loads((model / "ensemble_meta.json").read_text())
    return [model / m[key] for m in meta["members"]]


@pytest.mark.parametrize("damage", [flip_byte, truncate])
@pytest.mark.parametrize("member", [0, 1])
def test_damaged_onnx_member_is_refused(tmp_path, tiny_ensemble, damage, member):
    model = copy_model(tiny_ensemble, tmp_path / "model")
    victim = member_files(model, "onnx")[member]
    damage(victim)
    with pytest.raises(ModelFileError) as e:
        Ensemble.load(model, backend="onnx")
    msg = str(e.value)
    assert str(victim) in msg and "sha256 mismatch" in msg and "refusing to load" in msg


def test_damaged_safetensors_member_is_refused(tmp_path, tiny_ensemble):
    model = copy_model(tiny_ensemble, tmp_path / "model")
    victim = member_files(model, "weights")[0]
    flip_byte(victim, offset=100)  # inside the JSON header: would still parse, differently
    with pytest.raises(ModelFileError, match=rf"{victim}: sha256 mismatch"):
        Ensemble.load(model, backend="torch")


def test_damaged_training_run_is_refused(tmp_path, tiny_runs):
    run = copy_model(tiny_runs["mobilenetv2"], tmp_path / "run")
    truncate(run / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"model\.safetensors: sha256 mismatch"):
        Ensemble.load(run, backend="torch")


def test_intact_copy_loads(tmp_path, tiny_ensemble):
    """The refusals above come from the damage, not from copying."""
    assert len(Ensemble.load(copy_model(tiny_ensemble, tmp_path / "m")).members) == 2


def test_predict_with_tampered_model_exits_1_with_one_line(tmp_path, tiny_ensemble, capsys):
    from bonefrac.cli.main import main

    model = copy_model(tiny_ensemble, tmp_path / "model")
    victim = member_files(model, "onnx")[1]
    flip_byte(victim)
    out = tmp_path / "out"
    code = main(["predict", str(real_images()[0]), "--model", str(model), "--out", str(out),
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("bonefrac predict: error: ")
    assert str(victim) in lines[0] and "sha256" in lines[0]
    assert not (out / "predictions.csv").exists()  # no results from an unverified model


# ------------------------------------------------------------------ no unpickling in src/
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can execute code from a data file: ``pickle``-family loads and Unpicklers,
    ``pandas.read_pickle``, ``torch.load`` without ``weights_only=True``, and ``numpy.load``
    with ``allow_pickle`` set to anything but False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        parts = name.split(".")
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}: {ast.unparse(node)}"
        if (parts[0] in PICKLE_MODULES and parts[-1] in ("load", "loads", "Unpickler", "open")
                or parts[-1] in ("read_pickle", "Unpickler")):
            found.append(where)
        elif name.endswith("torch.load"):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(where)
        elif parts[-1] == "load" and parts[0] in ("np", "numpy") and "allow_pickle" in kw:
            ap = kw["allow_pickle"]
            if not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(where)
    return found


def test_checker_catches_unsafe_loads():
    bad = ("import pickle, torch, numpy as np, joblib\n"
           "pickle.load(f)\npickle.loads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "np.load(p, allow_pickle=True)\nnp.load(p, allow_pickle=flag)\njoblib.load(p)\n"
           "pd.read_pickle(p)\npickle.Unpickler(f).load()\n")
    assert {hit.split(":")[1] for hit in unsafe_loads(bad)} == {str(i) for i in range(2, 11)}
    good = ("torch.load(p, map_location='cpu', weights_only=True)\n"
            "np.load(p, allow_pickle=False)\nnp.load(p)\njson.load(f)\nload_file(p)\n")
    assert unsafe_loads(good) == []


def test_no_code_in_src_unpickles():
    files = sorted((ROOT / "src").rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


# ---------------------------------------------------------------- one model-folder loader
def test_model_folder_tells_the_two_layouts_apart(tmp_path):
    from bonefrac.inference.model_folder import ENSEMBLE, RUN, ModelFolder, model_kind

    run_dir = tmp_path / "run"  # a training run as `bonefrac train` leaves it: no export yet
    run_dir.mkdir()
    base = ModelFolder.open(SHIPPED_BASELINE)  # its member's config is the run's model.json
    write_json(run_dir / "model.json", base.spec.members[0].config)
    shutil.copy(base.member_file(base.spec.members[0], "weights"), run_dir / "model.safetensors")
    ens, run = ModelFolder.open(SHIPPED_ENSEMBLE), ModelFolder.open(run_dir)
    assert (ens.kind, run.kind) == (ENSEMBLE, RUN) and run.is_run and not ens.is_run
    assert [m["name"] for m in run.members] == ["mobilenetv2"]  # a one-member ensemble meta
    assert model_kind(tmp_path / "empty") is None
    with pytest.raises(ModelFileError, match="empty does not exist"):
        ModelFolder.open(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a bonefrac model folder"):
        ModelFolder.open(tmp_path / "empty")


def test_model_folder_names_a_broken_meta_file(tmp_path):
    from bonefrac.inference.model_folder import ModelFolder

    (tmp_path / "ensemble_meta.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"ensemble_meta\.json: unreadable"):
        ModelFolder.open(tmp_path)
    (tmp_path / "ensemble_meta.json").unlink()
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ModelFileError, match=r"model\.json: not a bonefrac run file"):
        ModelFolder.open(tmp_path)


def test_member_file_checks_the_recorded_sha256(tmp_path):
    from bonefrac.inference.model_folder import ModelFolder

    model = copy_model(SHIPPED_ENSEMBLE, tmp_path / "m")
    folder = ModelFolder.open(model)
    spec = folder.members[0]
    assert folder.member_file(spec, "onnx") == model / spec["onnx"]
    flip_byte(model / spec["onnx"])
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        folder.member_file(spec, "onnx")
    assert folder.member_file(spec, "onnx", verify=False).is_file()


# ------------------------------------------------------------------ weights stored once
WEIGHT_SUFFIXES = {".onnx", ".safetensors", ".npz", ".pth", ".pt", ".bin"}


def test_no_two_tracked_weight_files_are_byte_identical():
    """A copy of a member's weights in a second folder doubles the wheel for nothing: a
    folder that reuses a member names the other folder's file (``../ensemble_.../x.onnx``)."""
    import hashlib
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    seen: dict[str, str] = {}
    for name in tracked:
        path = ROOT / name
        if Path(name).suffix not in WEIGHT_SUFFIXES or not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest not in seen, f"{name} is a byte-identical copy of {seen[digest]}"
        seen[digest] = name
    assert len(seen) >= 8  # the shipped members' ONNX and safetensors files at least
