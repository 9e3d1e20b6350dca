"""PyTorch execution of one member, with the same interface as the ONNX runner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bonefrac.models.net import FractureNet

if TYPE_CHECKING:  # the models layer sits below inference: the spec is a type hint only
    from bonefrac.inference.spec import MemberSpec


class TorchRunner:
    def __init__(self, model: FractureNet):
        self.model = model.eval()

    @classmethod
    def from_spec(cls, weights: Path, spec: MemberSpec) -> TorchRunner:
        """The member ``spec`` describes, its weights read from ``weights`` (the file its
        model folder resolved and verified)."""
        from bonefrac.models.net import load_member

        return cls(load_member(spec.arch, spec.config, weights, spec.preprocessing))

    has_pooled = True

    @property
    def has_det(self) -> bool:
        return self.model.det is not None

    @torch.inference_mode()
    def run_det(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output by name, as :meth:`OnnxRunner.run_det` gives them."""
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        outs = self.model.forward_export(xt)
        return {k: v.numpy() for k, v in zip(self.model.output_names, outs, strict=True)}

    def run(self, x: np.ndarray, want_cam: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        logits, cam, _ = self.run_outputs(x, want_cam)
        return logits, cam

    @torch.inference_mode()
    def run_outputs(self, x: np.ndarray, want_cam: bool = False, want_pooled: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        if want_cam or want_pooled:
            logits, cam, pooled = self.model.forward_outputs(xt)
            return (logits.numpy(), cam.numpy() if want_cam else None,
                    pooled.numpy() if want_pooled else None)
        return self.model(xt).numpy(), None, None
