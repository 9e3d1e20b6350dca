"""ONNX Runtime execution of one exported member (no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


class OnnxRunner:
    """One ONNX member: ``(N, 3, H, W)`` float32 -> logits ``(N, 2)`` and Grad-CAM ``(N, h, w)``.

    The graph has two outputs; ONNX Runtime skips nothing, but the CAM costs < 0.1 % of the
    FLOPs, so one graph serves both plain and explained prediction.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray, want_cam: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        names = self.output_names if want_cam else self.output_names[:1]
        outs = self.session.run(names, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return outs[0], (outs[1] if want_cam else None)
