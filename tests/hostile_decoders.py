"""Decoders that misbehave on purpose, for the isolation tests only (imported by the decode
pool's worker processes by name: ``DecodePool(decoder="hostile_decoders:by_name")``).

``by_name`` decodes normally, except for a file whose name (or last 16 bytes, e.g. after a JPEG's
end marker, where decoders ignore them) holds one of the words below:
``segv`` (a NULL read through ctypes: SIGSEGV), ``abort`` (SIGABRT), ``hang`` (never returns),
``oom`` (allocates 8 GiB), ``panic`` (raises a BaseException subclass, as pyo3's
PanicException is), ``exit`` (the process exits with code 3) and ``badshape`` (replies with
arrays of the wrong shape).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from bonefrac.data.io import Decoded, load_inputs


class FakePanic(BaseException):
    """Like pyo3's PanicException: a BaseException, not an Exception."""


def by_name(path, sizes, display=False, resize="stretch"):
    with open(path, "rb") as f:  # uploads arrive under a temporary name: a tag at the end too
        f.seek(max(0, os.path.getsize(path) - 16))
        name = Path(path).name + f.read().decode("latin-1")
    if "segv" in name:
        ctypes.string_at(0)
    if "abort" in name:
        os.abort()
    if "hang" in name:
        while True:
            time.sleep(1)
    if "oom" in name:
        bytearray(8 * 2**30)
    if "panic" in name:
        raise FakePanic("called `Result::unwrap()` on an `Err` value")
    if "exit" in name:
        os._exit(3)
    if "badshape" in name:
        return Decoded({s: np.zeros((s + 1, s), np.uint8) for s in sizes}, None, 64, 64)
    return load_inputs(path, sizes, display, resize)


def size_notes(path) -> str:
    """A check for ``DecodePool.decode(checks=...)``: the file's size in bytes."""
    return f"{os.path.getsize(path)} bytes"
