"""The closed-form Grad-CAM in the graph (``FractureNet.forward_with_cam``) against autograd,
ONNX against torch, and the Adebayo et al. (2018) model-randomisation sanity check.

Grad-CAM (Selvaraju et al.): alpha_c = spatial mean of d(score)/dA_c, map = ReLU(sum_c alpha_c
A_c), score = z_fractured - z_non_fractured, A = the last feature maps. The head's GAP makes
d(score)/dA_c,ij = d(score)/d(pooled_c) / (h*w), so the closed form (which uses the gradient
w.r.t. the pooled features) is exactly h*w times the paper's map; maps are normalised to
[0, 1] downstream, where the factor cancels.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_images
from scipy.stats import spearmanr

from bonefrac.data.io import load_gray
from bonefrac.inference.ensemble import Ensemble, _normalise_cam
from bonefrac.models import load_member

SIZE = 160  # larger than the 96 px the tiny members saw: 5x5 maps instead of 3x3 (the net is
# fully convolutional + GAP, so it runs at any size; the identities below hold at any size)
N_IMAGES = 6


def _load(run: Path):
    mj = json.loads((run / "model.json").read_text())
    return load_member(mj["arch"], mj, run / mj["weights_file"], mj["preprocessing"])


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    files = real_images()
    step = len(files) // N_IMAGES
    return np.stack([load_gray(f, SIZE) for f in files[::step][:N_IMAGES]])  # both classes


def autograd_gradcam(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference Grad-CAM via autograd: hook the last feature maps, backprop the score."""
    store = {}

    def hook(_module, _inp, out):
        out.retain_grad()
        store["A"] = out

    h = model.features.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        h.remove()
    (logits[:, 1] - logits[:, 0]).sum().backward()  # samples are independent in eval mode
    a = store["A"]
    alpha = a.grad.mean(dim=(2, 3))  # (N, C)
    cam = torch.relu(torch.einsum("nc,nchw->nhw", alpha, a))
    return logits.detach(), cam.detach()


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnet_lite0"])
def test_closed_form_equals_autograd(tiny_runs, gray, arch):
    model = _load(tiny_runs[arch])
    x = torch.from_numpy(model.preprocessing(gray))
    ref_logits, ref = autograd_gradcam(model, x.clone().requires_grad_(True))
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
    h, w = cam.shape[1:]
    assert (h, w) == (SIZE // 32, SIZE // 32)
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-6)
    assert (ref.flatten(1).amax(1) > 0).sum() >= len(ref) // 2  # mostly non-trivial maps
    # float32: the two differ only in how the channel weights are summed (~1e-7 relative)
    scale = ref.abs().max()
    assert torch.allclose(cam / (h * w), ref, rtol=1e-4, atol=1e-5 * scale)
    # and as shown to users (each map scaled to [0, 1]) they agree
    np.testing.assert_allclose(_normalise_cam(cam.numpy()), _normalise_cam(ref.numpy()),
                               atol=1e-4)


def test_onnx_cam_equals_torch(tiny_ensemble, gray):
    onnx = Ensemble.load(tiny_ensemble, backend="onnx")
    ref = Ensemble.load(tiny_ensemble, backend="torch")
    g = {s: np.stack([load_gray(f, s) for f in real_images()[::4]]) for s in onnx.sizes}
    a, b = onnx.member_logits(g, want_cam=True), ref.member_logits(g, want_cam=True)
    for name in a:
        (la, ca), (lb, cb) = a[name], b[name]
        np.testing.assert_allclose(la, lb, atol=1e-4)
        assert ca.shape == cb.shape and ca.ndim == 3
        np.testing.assert_allclose(ca, cb, rtol=1e-3, atol=1e-4 * max(1e-6, cb.max()))
    pa, pb = onnx.predict_gray(g, explain=True), ref.predict_gray(g, explain=True)
    np.testing.assert_allclose(pa.prob, pb.prob, atol=1e-5)
    np.testing.assert_allclose(pa.cam, pb.cam, atol=1e-3)


def _mean_spearman(maps_a: np.ndarray, maps_b: np.ndarray) -> tuple[float, int]:
    """Mean Spearman correlation over images whose two maps both vary; and how many did."""
    rs = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(maps_a, maps_b, strict=True)
          if a.std() > 0 and b.std() > 0]
    return float(np.mean(rs)) if rs else float("nan"), len(rs)


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnet_lite0"])
def test_randomised_head_changes_the_maps(tiny_runs, gray, arch):
    """Adebayo et al.'s model-parameter randomisation test: re-initialising the head must change
    the explanation clearly. Criterion: mean Spearman correlation between the trained model's
    maps and a randomised-head model's maps (3 seeds, 6 real images) below 0.5, where the
    model with itself scores 1. A head-independent "explanation" (channel-mean activation)
    scores exactly 1 here, so the criterion catches a method that ignores the head."""
    model = _load(tiny_runs[arch])
    x = torch.from_numpy(model.preprocessing(gray))
    cam, energy = _cam_and_energy(model, x)
    assert _mean_spearman(cam, cam)[0] == pytest.approx(1.0)
    corrs, energy_corrs = [], []
    for seed in range(3):
        rand = copy.deepcopy(model)
        torch.manual_seed(seed)
        rand.head.fc1.reset_parameters()
        rand.head.fc2.reset_parameters()
        cam_r, energy_r = _cam_and_energy(rand, x)
        r, n_valid = _mean_spearman(cam, cam_r)
        assert n_valid >= len(cam) // 2, "too many constant maps for a meaningful test"
        corrs.append(r)
        energy_corrs.append(_mean_spearman(energy, energy_r)[0])
    assert np.mean(corrs) < 0.5, f"maps barely depend on the head: {corrs}"
    assert np.mean(energy_corrs) >= 0.5  # the control fails the criterion, as it should


@torch.no_grad()
def _cam_and_energy(model, x) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps and, from the same pass, the channel-mean of the last feature maps."""
    store = {}
    h = model.features.register_forward_hook(lambda _m, _i, out: store.update(A=out))
    try:
        _, cam = model.forward_with_cam(x)
    finally:
        h.remove()
    return cam.numpy(), store["A"].mean(1).numpy()
