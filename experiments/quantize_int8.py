"""Static int8 quantisation (QDQ, Conv layers) of each ensemble member, calibrated on TRAINING
images, against fp32: CPU ms per image and the fused test-split ROC-AUC. Prints JSON.

The issue's gate: adopt int8 only if it is faster AND the test AUC drops by <= 0.005.
Gemm layers stay fp32 (quantising them crashes ONNX Runtime's quantiser here).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from bonefrac.cli.common import DEFAULT_MODEL
from bonefrac.data.dataset import decode_all, load_index
from bonefrac.data.preprocess import Preprocessing
from bonefrac.evaluation.calibration import calibrated_prob
from bonefrac.evaluation.metrics import roc_auc
from bonefrac.inference.ensemble import fuse
from bonefrac.inference.runners import session_options


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self.it = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def _logits(path: Path, x: np.ndarray, bs: int = 8) -> tuple[np.ndarray, float]:
    """Logits and the best-of-3 single-thread CPU ms per image."""
    s = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    s.run(["logits"], {"input": x[:bs]})
    best = float("inf")
    for _ in range(3):
        t = time.thread_time()
        out = np.concatenate([s.run(["logits"], {"input": x[i:i + bs]})[0]
                              for i in range(0, len(x), bs)])
        best = min(best, (time.thread_time() - t) / len(x) * 1e3)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/bone-fracture")
    ap.add_argument("--calibration-images", type=int, default=100)
    args = ap.parse_args()
    meta = json.loads((args.model / "ensemble_meta.json").read_text())
    index = load_index(args.data)
    train = index.split("train")[:: max(1, len(index.split("train")) // args.calibration_images)]
    g_train = decode_all(train[: args.calibration_images], 224, desc="calibration",
                         resize="stretch").images
    g_test, kept, _, _ = decode_all(index.split("test"), 224, desc="test", resize="stretch")
    y = np.array([s.label for s in kept])
    res, probs = {"model": str(args.model), "test_images": len(y)}, {"fp32": {}, "int8": {}}
    weights = {m["name"]: m["fusion_weight"] for m in meta["members"]}
    with tempfile.TemporaryDirectory() as tmp:
        for m in meta["members"]:
            pre = Preprocessing.from_dict(m["preprocessing"])
            src, prep, q = (args.model / m["onnx"], Path(tmp) / "prep.onnx",
                            Path(tmp) / f"{m['name']}_int8.onnx")
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
            quantize_static(str(prep), str(q), _Reader(pre(g_train)),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv"])
            x = pre(g_test)
            (zf, f_ms), (zq, q_ms) = _logits(src, x), _logits(q, x)
            probs["fp32"][m["name"]] = calibrated_prob(zf, m["temperature"])
            probs["int8"][m["name"]] = calibrated_prob(zq, m["temperature"])
            res[m["name"]] = {"fp32_cpu_ms_per_image": round(f_ms, 2),
                              "int8_cpu_ms_per_image": round(q_ms, 2),
                              "speedup": round(f_ms / q_ms, 3),
                              "max_abs_prob_diff": float(np.abs(probs["fp32"][m["name"]]
                                                                - probs["int8"][m["name"]]).max())}
    auc = {k: roc_auc(y, fuse(v, weights)) for k, v in probs.items()}
    res.update({"auc_fp32": auc["fp32"], "auc_int8": auc["int8"],
                "auc_drop": auc["fp32"] - auc["int8"]})
    faster = all(res[m["name"]]["speedup"] > 1 for m in meta["members"])
    res["adopt_int8"] = bool(faster and res["auc_drop"] <= 0.005)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
