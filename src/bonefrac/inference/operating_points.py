"""The decision rule, in one object: a model's default threshold and its named operating points.

Fitted on the evaluation side (:func:`bonefrac.evaluation.fitting.fit_operating_points`, on
VALIDATION data), stored in the model folder (``threshold`` + ``operating_points`` of
:mod:`bonefrac.inference.spec`) and applied here by every caller: the Python API, the CLI,
the REST server and the DICOM results. The unknown-name check exists only in
:meth:`OperatingPoints.check`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from bonefrac import InputError

# The name of the model's own threshold (``threshold`` in the meta), beside the named points.
DEFAULT_POINT = "default"


class UnknownOperatingPoint(InputError):
    """An operating point the model does not have; the message lists the ones it has."""


@dataclass(frozen=True)
class OperatingPoint:
    """One named decision threshold on the fused, calibrated P(fractured) (in [0, 1]) and how
    it was chosen (``policy`` as in :mod:`bonefrac.evaluation.thresholds`)."""

    threshold: float
    policy: str | None = None
    description: str | None = None
    chosen_how: str | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as is

    def to_dict(self) -> dict:
        known = {"threshold": self.threshold, "policy": self.policy,
                 "description": self.description, "chosen_how": self.chosen_how}
        return {**{k: v for k, v in known.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping) -> OperatingPoint:
        known = ("threshold", "policy", "description", "chosen_how")
        return cls(float(d["threshold"]), *(d.get(k) for k in known[1:]),
                   extra={k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class OperatingPoints:
    """The default threshold and the named points (``{"triage": ..., "confirmation": ...}``)."""

    default: float
    points: Mapping[str, OperatingPoint] = field(default_factory=dict)

    def __post_init__(self):
        for name, t in (("default", self.default),
                        *((k, p.threshold) for k, p in self.points.items())):
            if not 0.0 <= t <= 1.0 + 1e-6:  # a policy may put a threshold just above 1
                raise InputError(f"operating point {name!r}: threshold {t} outside [0, 1]")
        if DEFAULT_POINT in self.points:
            raise InputError(f"{DEFAULT_POINT!r} names the model's own threshold, not a point")

    @property
    def names(self) -> tuple[str, ...]:
        """``("default", *named points)``: what ``operating_point=`` accepts."""
        return (DEFAULT_POINT, *self.points)

    def check(self, point: str | None) -> str:
        """The point's name (None -> ``"default"``); :class:`UnknownOperatingPoint` if the
        model has no such point."""
        if point is None or point == DEFAULT_POINT:
            return DEFAULT_POINT
        if point not in self.points:
            raise UnknownOperatingPoint(f"unknown operating point {point!r}; this model has: "
                                        f"{', '.join(self.names)}")
        return point

    def threshold(self, point: str | None = None) -> float:
        """The threshold of ``point`` (None or ``"default"``: the model's own)."""
        name = self.check(point)
        return float(self.default if name == DEFAULT_POINT else self.points[name].threshold)

    def decide(self, prob: np.ndarray | float, point: str | None = None) -> np.ndarray:
        """True where P(fractured) >= the threshold of ``point`` (same shape as ``prob``)."""
        return np.asarray(prob) >= self.threshold(point)

    def thresholds(self) -> dict[str, float]:
        """``{"default": t, "triage": t, ...}``: every name with its threshold."""
        return {name: self.threshold(name) for name in self.names}

    def named_thresholds(self) -> dict[str, float]:
        """The named points' thresholds alone (the meta's ``operating_points``, numbers only)."""
        return {k: float(p.threshold) for k, p in self.points.items()}

    def replace_default(self, threshold: float) -> OperatingPoints:
        """The same points with another default threshold (an evaluation re-tuned on its data)."""
        return OperatingPoints(float(threshold), self.points)

    def to_meta(self) -> dict:
        """``{"threshold": ..., "operating_points": {...}}`` as the model folder stores them."""
        return {"threshold": float(self.default),
                "operating_points": {k: p.to_dict() for k, p in self.points.items()}}

    @classmethod
    def from_meta(cls, threshold: float, points: Mapping[str, Mapping] | None) -> OperatingPoints:
        return cls(float(threshold),
                   {k: OperatingPoint.from_dict(v) for k, v in (points or {}).items()})
