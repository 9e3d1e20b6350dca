"""ONNX Runtime execution of one exported member (no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def default_threads() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def session_options(threads: int | None = None):
    """ONNX Runtime CPU session options, as measured best for these small CNNs.

    - ``ORT_ENABLE_ALL``: the NCHWc conv layout it enables halves the per-image cost of
      MobileNetV2 / EfficientNet-Lite0 compared with ``ORT_ENABLE_EXTENDED``.
    - intra-op pool threads do not spin while idle: spinning burns the cores that the decode
      threads (and other runs sharing the session) need; the wake-up cost is microseconds.
    - ``threads=1`` runs the graph on the calling thread: the batch pipeline gets its
      parallelism from several runs at once instead (see ``bonefrac.inference.predict``).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OnnxRunner:
    """One ONNX member: ``(N, 3, H, W)`` float32 -> logits ``(N, 2)``, heat map ``(N, h, w)`` and
    (graphs exported since the domain gate) pooled features ``(N, C)``.

    The map costs < 0.1 % of the FLOPs, so one graph serves both plain and explained
    prediction. ``run`` may be called from
    several threads at once (ONNX Runtime sessions are thread-safe and release the GIL).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = threads or default_threads()
        self.session = ort.InferenceSession(str(path), session_options(self.threads),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def has_det(self) -> bool:
        """Whether the graph emits raw detections ``det`` (models with a detection head)."""
        return "det" in self.output_names

    def run_det(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph by name (``logits``, ``cam``, ``pooled``, ``det``), from
        one run: what prediction with a detection head needs."""
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return dict(zip(self.output_names, outs, strict=True))

    @property
    def has_pooled(self) -> bool:
        """Whether the graph emits the pooled features (exports before the domain gate do not)."""
        return "pooled" in self.output_names

    def run(self, x: np.ndarray, want_cam: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        logits, cam, _ = self.run_outputs(x, want_cam)
        return logits, cam

    def run_outputs(self, x: np.ndarray, want_cam: bool = False, want_pooled: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Logits ``(N, 2)``, the map ``(N, h, w)`` if asked for and the pooled features
        ``(N, C)`` if asked for (and the graph has them), from one run of the graph."""
        pooled = want_pooled and self.has_pooled
        names = self.output_names[:1 + want_cam] + ["pooled"] * pooled  # logits, cam first
        outs = self.session.run(names, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return outs[0], outs[1] if want_cam else None, outs[-1] if pooled else None
