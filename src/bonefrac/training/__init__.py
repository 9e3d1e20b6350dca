"""Training: two-stage transfer learning on cached frozen-backbone activations (torch)."""

from bonefrac.training.config import TrainConfig


def train(*args, **kwargs):
    """See :func:`bonefrac.training.trainer.train` (imported lazily: it needs torch)."""
    from bonefrac.training.trainer import train as _train

    return _train(*args, **kwargs)


__all__ = ["TrainConfig", "train"]
