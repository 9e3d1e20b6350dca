"""Data: decoding, preprocessing (no torch) and data-set indexing with leakage-safe splits."""

from bonefrac.data.io import ImageReadError, load_gray
from bonefrac.data.preprocess import Preprocessing

__all__ = ["ImageReadError", "Preprocessing", "load_gray"]
