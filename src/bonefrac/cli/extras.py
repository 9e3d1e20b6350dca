"""Which optional extras a command needs, checked before it does any work.

A command that dies on a missing import after minutes of inference strands the user; these
checks use ``importlib.util.find_spec`` only, so they import nothing and cost microseconds, and
the message is the exact pip line that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from bonefrac.cli.common import CLIError
from bonefrac.data.limits import DICOM_SUFFIXES

# extra (pyproject.toml [project.optional-dependencies]) -> import names that prove it is there
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "torchvision", "timm", "safetensors", "onnx", "onnxscript", "sklearn",
              "matplotlib", "pycocotools"),
    "eval": ("sklearn", "matplotlib", "pycocotools"),
    "serve": ("fastapi", "uvicorn", "python_multipart"),
    "dicom": ("pydicom",),
    "dicom-node": ("pydicom", "pynetdicom", "highdicom"),
}


def pip_line(extra: str) -> str:
    """The install command for ``extra``, as run from the bonefrac checkout."""
    return f"pip install -e '.[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _importable(m)]


def require_extra(extra: str, command: str) -> None:
    """Raise :class:`CLIError` with the pip line if any module of ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        raise CLIError(f"`bonefrac {command}` needs the [{extra}] extra ({', '.join(missing)} "
                       f"not installed): {pip_line(extra)}")


def require_dicom_for(paths: Iterable[str | os.PathLike], command: str) -> None:
    """Raise :class:`CLIError` if a file named like DICOM (.dcm/.dicom) is among ``paths`` and
    pydicom is missing; folders are searched recursively. Files with other names are still
    sniffed per file, and one without pydicom gets its own error row with the same hint."""
    if not missing_modules("dicom"):
        return
    first = next((p for p in _files(paths) if p.suffix.lower() in DICOM_SUFFIXES), None)
    if first is not None:
        raise CLIError(f"`bonefrac {command}`: {first} is DICOM, which needs the [dicom] extra "
                       f"(pydicom not installed): {pip_line('dicom')}")


def _files(paths: Iterable[str | os.PathLike]) -> Iterable[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from (f for f in p.rglob("*") if f.is_file())
        else:
            yield p


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a stub without a spec
        return False
