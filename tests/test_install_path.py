"""The light install never strands a user: every command that needs an extra says so before
doing any work, with the exact pip line, and `bonefrac models` works without torch.

Each case runs the CLI in a fresh interpreter where the extra's modules cannot be imported
(None in sys.modules), as on an install without them."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, real_images

from bonefrac.cli.main import is_expected
from bonefrac.evaluation.thresholds import parse_policy
from bonefrac.inference.model_folder import ModelFileError

TORCH = ("torch", "torchvision", "timm", "safetensors", "onnx", "onnxscript")


def cli_without(modules: tuple[str, ...], *argv: str, cwd: Path | None = None
                ) -> subprocess.CompletedProcess:
    code = (f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
            "from bonefrac.cli.main import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_models_lists_architectures_without_torch():
    out = cli_without(TORCH, "models")
    assert out.returncode == 0, out.stderr
    assert {line.split()[0] for line in out.stdout.splitlines()} == {
        "mobilenetv2", "efficientnet_lite0", "efficientnet_b0"}


def test_evaluate_without_matplotlib_fails_fast_with_the_pip_line(tmp_path):
    t = time.monotonic()
    out = cli_without(("matplotlib", "sklearn"), "evaluate", "--data", str(tmp_path))
    elapsed = time.monotonic() - t
    assert out.returncode == 1
    assert "pip install -e '.[eval]'" in out.stderr and "Traceback" not in out.stderr
    assert elapsed < 2.0, f"took {elapsed:.2f} s"


@pytest.mark.parametrize(("argv", "extra"), [
    (("train", "--data", "D", "--out", "O"), "train"),
    (("export", "--out", "O"), "train"),
    (("ensemble", "fit", "--members", "A", "--data", "D", "--out", "O"), "train"),
    # a real image: predict checks its inputs before its backend
    (("predict", "{img}", "--backend", "torch", "--out", "{tmp}"), "train"),
])
def test_torch_commands_without_torch_give_the_pip_line(tmp_path, argv, extra):
    out = cli_without(TORCH, *(a.format(tmp=tmp_path / "o", img=real_images(1)[0])
                               for a in argv))
    assert out.returncode == 1, out.stderr
    assert f"pip install -e '.[{extra}]'" in out.stderr and "Traceback" not in out.stderr


def test_serve_without_fastapi_gives_the_pip_line():
    out = cli_without(("fastapi", "uvicorn"), "serve", "--port", "8123")
    assert out.returncode == 1
    assert "pip install -e '.[serve]'" in out.stderr and "Traceback" not in out.stderr


def test_predict_dicom_without_pydicom_stops_before_work(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"\0" * 132 + b"DICM")
    out = cli_without(("pydicom",), "predict", str(tmp_path / "in"), "--out",
                      str(tmp_path / "out"))
    assert out.returncode == 1
    assert "pip install -e '.[dicom]'" in out.stderr and "a.dcm" in out.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_run_without_onnx_and_without_torch_says_export(tmp_path):
    """A freshly trained run has safetensors only; without torch the message names the fix."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({
        "arch": "mobilenetv2", "weights_file": "model.safetensors",
        "preprocessing": {"size": 96, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    out = cli_without(TORCH, "predict", str(ROOT / "examples" / "test_images"), "--model",
                      str(run), "--out", str(tmp_path / "out"))
    assert out.returncode == 1
    assert "bonefrac export --model" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ one line or a traceback
def _caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # the test wants the exception itself
        return e
    raise AssertionError("no exception")


def test_deliberate_errors_are_one_line_and_bugs_are_not():
    assert is_expected(_caught(lambda: parse_policy("nonsense")))  # bonefrac's own raise
    assert is_expected(ModelFileError("m: sha256 mismatch"))
    assert is_expected(_caught(lambda: Path("/no/such/file").read_text()))
    assert is_expected(ModuleNotFoundError("x", name="matplotlib"))
    assert not is_expected(_caught(lambda: int("x")))  # ValueError from Python itself
    assert not is_expected(_caught(lambda: {}["k"]))  # a KeyError outside any raise
    assert not is_expected(ModuleNotFoundError("x", name="bonefrac.nope"))
    assert not is_expected(_caught(lambda: 1 / 0))


def test_a_bug_in_a_command_is_one_line_naming_its_traceback_log(monkeypatch, tmp_path,
                                                                  capsys):
    from bonefrac.cli import main as cli_main
    from bonefrac.cli import models

    def broken(args):
        return {}["oops"]

    monkeypatch.setenv("BONEFRAC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "run", broken)
    assert cli_main.main(["models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bonefrac models: internal error"), err
    log = Path(err[0].rsplit("traceback written to ", 1)[1])
    assert log.parent == tmp_path / "cache" / "crash"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'oops'" in text
    assert "in broken" in text  # the frame that raised


def test_every_exception_class_of_bonefrac_derives_from_bonefrac_error():
    """One base for the CLI's one-line rule; the historical bases kept for ``except``."""
    import ast

    from bonefrac import BonefracError

    found = []
    for f in sorted((ROOT / "src" / "bonefrac").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(b) in ("Exception", "ValueError", "KeyError")
                    or ast.unparse(b).endswith(("Error", "Refused")) for b in node.bases):
                found.append((f, node))
    assert len(found) >= 12
    for f, node in found:
        mod = ".".join(f.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(
            ".__init__")
        cls = getattr(importlib.import_module(mod), node.name)
        assert issubclass(cls, BonefracError), f"{mod}.{node.name}"
