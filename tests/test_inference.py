"""The ONNX prediction path: parity with PyTorch, torch-free, same inputs as training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import EXAMPLES, SHIPPED_ENSEMBLE, TEST_DATA, real_images
from PIL import Image

from bonefrac.data.io import load_gray
from bonefrac.inference.domain import BLANK_STD, cheap_checks
from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.predict import iter_predictions, predict_files

TOL = 1e-4  # fp32 ONNX Runtime vs PyTorch eager, on probabilities


def _max_prob_diff(model: Path, files: list[Path]) -> float:
    onnx, torch_ = (Ensemble.load(model, backend=b) for b in ("onnx", "torch"))
    gray = {s: np.stack([load_gray(f, s, onnx.resize) for f in files]) for s in onnx.sizes}
    a, b = onnx.predict_gray(gray), torch_.predict_gray(gray)
    diffs = [np.abs(a.prob - b.prob).max()]
    diffs += [np.abs(a.member_probs[k] - b.member_probs[k]).max() for k in a.member_probs]
    return float(max(diffs))


def test_onnx_matches_torch_on_real_images(tiny_ensemble):
    assert _max_prob_diff(tiny_ensemble, real_images()) <= TOL


@pytest.mark.slow  # both members in torch and ONNX on the example images: ~8 s
@pytest.mark.skipif(not (SHIPPED_ENSEMBLE / "ensemble_meta.json").is_file(),
                    reason="shipped ensemble not built yet")
def test_shipped_ensemble_onnx_matches_torch():
    files = sorted(EXAMPLES.glob("*.jpg")) + real_images(10)
    assert _max_prob_diff(SHIPPED_ENSEMBLE, files) <= TOL


def test_prediction_in_fresh_process_never_imports_torch(tiny_ensemble, tmp_path):
    code = (
        "import json, sys\n"
        "from bonefrac.cli.main import main\n"
        f"rc = main(['predict', {str(TEST_DATA)!r}, '--model', {str(tiny_ensemble)!r},\n"
        f"           '--out', {str(tmp_path / 'out')!r}, '--quiet', '--explain'])\n"
        "print(json.dumps({'rc': rc, 'torch': sorted(m for m in sys.modules\n"
        "                                            if m.split('.')[0] == 'torch')}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"rc": 0, "torch": []}
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert len(rows) == len(real_images())
    assert all(Path(r["heatmap"]).is_file() for r in rows)  # --explain needs no torch either


class _Recorder:
    """Wraps a runner and keeps every input batch it is given."""

    def __init__(self, runner):
        self.runner, self.inputs, self.logits = runner, [], []

    def run(self, x, want_cam=False):
        out = self.runner.run(x, want_cam)
        self.inputs.append(np.array(x))
        self.logits.append(out[0])
        return out


def test_inference_inputs_equal_training_inputs(tiny_ensemble):
    """The tensors the ONNX members receive in ``predict_files`` are bit-identical to what the
    trainer feeds the network (``decode_all`` + ``model.preprocessing``), and the torch
    ``FractureNet`` on the training-built tensors gives the ONNX logits."""
    import torch

    from bonefrac.data.dataset import decode_all, load_index

    samples = load_index(TEST_DATA).split("val") + load_index(TEST_DATA).split("test")
    onnx = Ensemble.load(tiny_ensemble, backend="onnx")
    torch_ens = Ensemble.load(tiny_ensemble, backend="torch")
    for m in onnx.members:
        m.runner = _Recorder(m.runner)
    res = predict_files(onnx, [s.path for s in samples], batch_size=5, workers=2,
                        progress=False)
    assert not res.errors and [r["file"] for r in res.rows] == [str(s.path) for s in samples]
    for m, tm in zip(onnx.members, torch_ens.members, strict=True):
        model = tm.runner.model  # the trained FractureNet, rebuilt from safetensors
        prep = model.preprocessing
        imgs, kept, skipped, _ = decode_all(samples, prep.size, resize=prep.resize)
        assert not skipped and len(kept) == len(samples)
        x_train = model.preprocessing(imgs)
        # Batches may finish in any order across workers; match them by content.
        x_inf = np.concatenate(m.runner.inputs)
        order = [int(np.argmin(np.abs(x_train - xi).reshape(len(x_train), -1).max(1)))
                 for xi in x_inf]
        assert sorted(order) == list(range(len(samples)))
        np.testing.assert_array_equal(x_inf, x_train[order])
        with torch.inference_mode():
            z_torch = model(torch.from_numpy(x_train)).numpy()
        z_onnx = np.concatenate(m.runner.logits)
        np.testing.assert_allclose(z_onnx, z_torch[order], atol=1e-4, rtol=0)


def test_training_augmentation_keeps_the_pixel_domain():
    """Augmented views go through the same ``Preprocessing`` as inference inputs, so the
    augmentation must return the same uint8 (N, H, W) layout: an identity transform is exact."""
    from torchvision.transforms import v2

    from bonefrac.training.augment import augment_batch, train_augmentation

    gray = np.stack([load_gray(f, 96, "stretch") for f in real_images(4)])
    ident = v2.RandomAffine(degrees=0, translate=None, scale=(1.0, 1.0),
                            interpolation=v2.InterpolationMode.BILINEAR, fill=0)
    np.testing.assert_array_equal(augment_batch(gray, ident), gray)
    aug = augment_batch(gray, train_augmentation())
    assert aug.shape == gray.shape and aug.dtype == np.uint8


def test_results_do_not_depend_on_batching_or_threads(tiny_ensemble):
    """Resumed and sharded runs batch files differently; their rows must still be identical."""
    ens = Ensemble.load(tiny_ensemble, backend="onnx", threads=1)
    files = real_images(12)
    ref = predict_files(ens, files, batch_size=12, workers=1, progress=False).rows
    for batch, workers in ((1, 2), (5, 2), (8, 1)):
        assert predict_files(ens, files, batch_size=batch, workers=workers,
                             progress=False).rows == ref
    threaded = Ensemble.load(tiny_ensemble, backend="onnx", threads=2)
    got = predict_files(threaded, files, batch_size=4, workers=1, progress=False).rows
    assert [r["file"] for r in got] == [r["file"] for r in ref]
    assert max(abs(a["prob_fractured"] - b["prob_fractured"]) for a, b in
               zip(got, ref, strict=True)) <= 2e-6


def test_iter_predictions_keeps_file_order_and_reports_bad_files(tiny_ensemble, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(real_images(1)[0].read_bytes()[:300])  # a truncated real JPEG
    files = real_images(5)[:2] + [bad] + real_images(5)[2:]
    ens = Ensemble.load(tiny_ensemble, backend="onnx", threads=1)
    got = list(iter_predictions(ens, files, batch_size=2, workers=2))
    assert [n for n, _, _ in got] == [2, 2, 2]
    assert [r["file"] for _, rows, _ in got for r in rows] == [str(f) for f in files if f != bad]
    errors = [e for _, _, errs in got for e in errs]
    assert [e["file"] for e in errors] == [str(bad)] and errors[0]["reason"]


def test_warnings_flag_tiny_and_blank_images(tmp_path):
    src = real_images(1)[0]
    with Image.open(src) as im:
        im.convert("L").resize((48, 40)).save(tmp_path / "tiny.png")
    Image.new("L", (300, 300), 40).save(tmp_path / "blank.png")
    for name, note in (("tiny.png", "upscaled"), ("blank.png", "uniform")):
        assert note in cheap_checks(tmp_path / name, load_gray(tmp_path / name, 224, "stretch"))
    for f in real_images():  # no false alarms on real radiographs
        g = load_gray(f, 224, "stretch")
        assert g.std() > BLANK_STD and cheap_checks(f, g) == ""
