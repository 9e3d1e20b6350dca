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
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import real_images
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
    # both classes
    return np.stack([load_gray(f, SIZE, "stretch") for f in files[::step][:N_IMAGES]])


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
    g = {s: np.stack([load_gray(f, s, onnx.resize) for f in real_images()[::4]])
         for s in onnx.sizes}
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


# ------------------------------------------------------------------------- overlay figures
def _det(x0, y0, x1, y1, rank=1, score=0.9) -> dict:
    return {"rank": rank, "score": score, "x0": x0, "y0": y0, "x1": x1, "y1": y1}


def _figure(gray, cam, prob=0.8, threshold=0.4, **kw):
    from bonefrac.inference.heatmap import render_overlay

    return render_overlay(gray, cam, prob=prob, threshold=threshold,
                          decision="fractured" if prob >= threshold else "non_fractured", **kw)


def _peaked_cam(h: int = 7, w: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - 2) ** 2 + (xx - 4) ** 2) / 4.0).astype(np.float32)


@pytest.mark.parametrize("hw", [(150, 300), (420, 512), (64, 40)])
def test_overlay_is_the_image_at_its_own_size_plus_margins(hw):
    from bonefrac.inference.heatmap import ALPHA, overlay

    h, w = hw
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    cam = _peaked_cam()
    fig = _figure(gray, cam)
    assert fig.mode == "RGB" and fig.width > w and fig.height > h  # colour bar, caption
    a = np.asarray(fig)
    # the image area is the radiograph unscaled, with the map upsampled onto it
    assert np.array_equal(a[:h, :w], np.asarray(overlay(gray, cam, ALPHA)))
    # the colour bar (inferno: pale yellow at the top, purple lower down) is in the margin
    bar = a[:h, w:].astype(int)
    assert ((bar[..., 0] > 230) & (bar[..., 1] > 230) & (bar[..., 2] < 200)).any()  # yellow
    assert ((bar[..., 0] > 90) & (bar[..., 2] > 80) & (bar[..., 1] < 50)).any()  # purple
    assert a[h:].std() > 5  # the caption's text


def test_overlay_of_a_real_radiograph_keeps_its_aspect():
    f = sorted(real_images())[0]
    gray = load_gray(f, None)
    fig = _figure(gray, _peaked_cam(), boxes=[_det(0.2, 0.2, 0.6, 0.5)], peak=(0.4, 0.3))
    assert fig.width > gray.shape[1] and fig.height > gray.shape[0]
    assert fig.width - gray.shape[1] < gray.shape[1]  # margins, not a rescaled image
    assert fig.height - gray.shape[0] < gray.shape[0]


def test_box_and_peak_are_drawn_where_the_fractions_say():
    from bonefrac.inference.heatmap import BOX_COLOUR, line_width

    h, w = 200, 400
    gray = np.full((h, w), 128, np.uint8)
    box = (0.25, 0.1, 0.75, 0.6)  # pixels x 100..299, y 20..119
    fig = np.asarray(_figure(gray, np.zeros((7, 7), np.float32), boxes=[_det(*box)]))
    lw = line_width(w, h)
    white = (fig == BOX_COLOUR).all(axis=2)
    assert not white[:h, :w].all()
    assert white[20:120, 100:100 + lw].all() and white[20:120, 300 - lw:300].all()  # left, right
    assert white[20:20 + lw, 100:300].all() and white[120 - lw:120, 100:300].all()  # top, bottom
    assert not white[20:120, 99].any() and not white[20:120, 300].any()  # nothing outside
    assert not white[19, 100:300].any() and not white[120, 100:300].any()
    assert not white[20 + lw:120 - lw, 100 + lw:300 - lw].any()  # nor inside
    assert not white[:h, :w][~_box_mask(h, w, 100, 20, 300, 120)].any()
    assert (fig[:20, 100:160] != 128).any()  # its label "1: 0.90" above it (antialiased)
    assert (fig[:20, 160:w] == 128).all() and (fig[:20, :100] == 128).all()
    # the peak: a cross centred on its pixel
    fig = np.asarray(_figure(gray, np.zeros((7, 7), np.float32), peak=(0.5, 0.35)))
    white = (fig == BOX_COLOUR).all(axis=2)
    assert white[70, 200] and white[70, 195] and white[65, 200]
    assert not white[60, 190] and white[:h, :w].sum() < 100


def _box_mask(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_map_is_faded_below_the_threshold_not_stretched():
    from bonefrac.inference.heatmap import ALPHA, map_opacity

    assert map_opacity(0.8, 0.4) == map_opacity(0.4, 0.4) == ALPHA
    assert map_opacity(0.1, 0.4) == pytest.approx(ALPHA * 0.25)
    assert map_opacity(0.0, 0.4) == 0.0 and map_opacity(0.3, 0.0) == ALPHA
    h, w = 120, 160
    gray = np.full((h, w), 100, np.uint8)
    cam = _peaked_cam()  # the same map (peak 1) for both: only P differs

    def tint(prob):
        a = np.asarray(_figure(gray, cam, prob=prob, threshold=0.4))[:h, :w].astype(float)
        return np.abs(a - 100).mean()

    above, at, below = tint(0.9), tint(0.4), tint(0.1)
    assert above == at > 0
    assert below == pytest.approx(0.25 * above, rel=0.05)  # faded by P / threshold
    from bonefrac.inference.heatmap import caption_text

    assert "faded" in " ".join(caption_text(0.1, 0.4, "non_fractured"))
    assert caption_text(0.83, 0.41, "fractured") == [
        "P(fractured) 0.83", "threshold 0.41", "fractured", "RESEARCH USE ONLY"]


def test_save_overlay_writes_the_figure(tmp_path):
    from PIL import Image

    from bonefrac.inference.heatmap import heatmap_png, save_overlay

    gray = np.full((90, 130), 80, np.uint8)
    kw = {"prob": 0.2, "threshold": 0.5, "decision": "non_fractured",
          "boxes": [_det(0.1, 0.2, 0.5, 0.9)], "peak": (0.3, 0.5)}
    src = Path("/data/scans/knee.left.jpg")
    path = save_overlay(gray, _peaked_cam(), tmp_path, src, **kw)
    assert re.fullmatch(r"knee\.left_[0-9a-f]{8}_heatmap\.png", path.name)
    assert path.parent == tmp_path and sorted(tmp_path.iterdir()) == [path]  # no temp file left
    assert path.read_bytes() == heatmap_png(gray, _peaked_cam(), **kw)
    assert Image.open(path).size == _figure(gray, _peaked_cam(), 0.2, 0.5, boxes=kw["boxes"],
                                            peak=kw["peak"]).size
    other = save_overlay(gray, _peaked_cam(), tmp_path, Path("/other/knee.left.jpg"), **kw)
    assert other != path
