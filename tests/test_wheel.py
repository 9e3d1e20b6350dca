"""The distribution: ``python -m build`` makes a wheel that installs in a clean venv and predicts.

Slow (about 2 minutes on 2 cores: the build, then pip installing the wheel and its
dependencies from the package index into a new venv), so marked ``slow``. It builds from a
copy of the tracked files, so the checkout gets no ``build/`` or egg-info folders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, real_images

pytestmark = pytest.mark.slow

# PyPI's default per-file limit is 100 MiB: the wheel carries the shipped models' ONNX files,
# not their safetensors (pyproject's exclude-package-data).
MAX_WHEEL_MIB = 100


def _tracked_copy(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def test_wheel_builds_installs_in_a_clean_venv_and_predicts(tmp_path):
    pytest.importorskip("build")
    src = _tracked_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, timeout=900)
    (wheel,) = (tmp_path / "dist").glob("bonefrac-*.whl")
    size_mib = wheel.stat().st_size / 2**20
    print(f"wheel {wheel.name}: {size_mib:.1f} MiB")
    assert size_mib < MAX_WHEEL_MIB, f"{wheel.name} is {size_mib:.1f} MiB"
    with zipfile.ZipFile(wheel) as z:  # weights stored once in the wheel too
        names = z.namelist()
        assert "bonefrac/inference/model_folder.schema.json" in names
        digests = [hashlib.sha256(z.read(n)).hexdigest() for n in names
                   if n.endswith(".onnx")]
        assert not [n for n in names if n.endswith(".safetensors")]
    assert len(digests) == len(set(digests)) >= 5  # v1 2, v2 2, v3 1 (+ v2's Lite0)

    venv.create(tmp_path / "venv", with_pip=True)
    bin_ = tmp_path / "venv" / "bin"
    subprocess.run([str(bin_ / "pip"), "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=900)
    image = real_images(1)[0]
    out = tmp_path / "out"
    run = subprocess.run([str(bin_ / "bonefrac"), "predict", str(image), "--out", str(out),
                          "--quiet"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)  # not the checkout: the installed package only
    assert run.returncode == 0, run.stderr
    rows = json.loads((out / "predictions.json").read_text())["predictions"]

    import bonefrac

    want = bonefrac.load("ensemble").predict(image).prob_fractured
    assert rows[0]["prob_fractured"] == pytest.approx(want, abs=1e-6)
    code = ("import bonefrac, sys; r = bonefrac.load('baseline').predict(sys.argv[1]); "
            "print(bonefrac.load('baseline').root, r.prob_fractured, 'torch' in sys.modules)")
    base = subprocess.run([str(bin_ / "python"), "-c", code, str(image)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, check=True).stdout.split()
    assert "site-packages" in base[0] and base[2] == "False"
    # what needs the safetensors says where they are, in one line
    code = ("from bonefrac.inference.model_folder import ModelFolder, resolve_model; "
            "f = ModelFolder.open(resolve_model('ensemble')); "
            "f.member_file(f.spec.members[0], 'weights')")
    err = subprocess.run([str(bin_ / "python"), "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path).stderr
    assert "not installed. The bonefrac wheel carries the shipped models' ONNX files" in err
    assert float(base[1]) == pytest.approx(bonefrac.load("baseline").predict(image)
                                           .prob_fractured, abs=1e-6)
