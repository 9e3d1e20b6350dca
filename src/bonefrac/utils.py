"""Small helpers shared across the package (no torch)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, private: bool = False
                 ) -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place on success.

    Readers never see a half-written file; an exception leaves any previous file untouched.
    ``private``: keep the temporary file's mode 0600 (secrets), instead of the umask's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if private:
            os.replace(tmp, path)
        else:
            publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file normal permissions and rename it onto ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared models unreadable
    os.replace(tmp, path)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None: Python's json would write the token NaN, which is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(json_safe(obj), f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_csv(path: str | os.PathLike, fields: Sequence[str], rows: Iterable[Mapping]) -> None:
    """A CSV with header ``fields`` and one line per row (keys outside ``fields`` left out),
    written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def display_path(path: str | os.PathLike) -> str:
    """A path as text that is always valid UTF-8 (undecodable bytes shown as \\xNN escapes),
    so one odd file name cannot break writing CSV/JSON for all the others."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def cache_dir() -> Path:
    """Where converted weights and decoded-image caches live (``$BONEFRAC_CACHE``)."""
    d = Path(os.environ.get("BONEFRAC_CACHE") or Path.home() / ".cache" / "bonefrac")
    d.mkdir(parents=True, exist_ok=True)
    return d
