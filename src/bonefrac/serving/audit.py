"""The audit log: one JSON line per API request, each line chained to the one before it.

Every line carries ``seq`` (1, 2, ... across rotations) and ``prev``: the SHA-256 (hex) of the
previous line's bytes (without its newline; 64 zeros before the first line ever written). An
edited, inserted or removed line breaks the chain at the next line, which ``verify`` names.
Anyone able to rewrite the whole file can also recompute the chain: keep the head hash that
``bonefrac audit verify`` prints somewhere else (a ticket, a second machine) to anchor it.

Appends are atomic: each line is one ``write`` on an ``O_APPEND`` file (mode 0600) under a
lock, then ``fsync``, so a crash leaves whole lines only. When the file would grow past
``max_bytes`` it is renamed to ``NAME.<UTC time>`` (names that sort in time order; never
deleted here) and a new file continues the chain, so
``bonefrac audit verify NAME.* NAME`` checks the whole history.

What a line holds is the caller's choice (``serving.security`` writes time, token name, address,
endpoint, per-file sha256/size/P(fracture)/decision, model id and fingerprint, latency,
status); nothing here looks at pixels.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bonefrac import BonefracError, InputError

GENESIS = "0" * 64


class AuditChainError(BonefracError, ValueError):
    """A broken chain: ``str()`` names the file and line."""


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one line's bytes, without its trailing newline."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The last line of ``path`` (read backwards in blocks), or None for an empty file."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        pos, buf = end, b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
        return buf.rstrip(b"\n").rsplit(b"\n", 1)[-1]


class AuditLog:
    """Append-only, hash-chained JSON-lines log at ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 64 * 2**20,
                 fsync: bool = True):
        if max_bytes < 4096:
            raise InputError("audit log: max_bytes must be >= 4096")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev, self._seq = self._resume()
        self._fd: int | None = self._open()

    def _resume(self) -> tuple[str, int]:
        """(hash of the last line, its seq) of an existing log, to continue its chain."""
        if not self.path.exists():
            return GENESIS, 0
        last = _last_line(self.path)
        if last is None:
            return GENESIS, 0
        try:
            seq = int(json.loads(last)["seq"])
        except (ValueError, KeyError, TypeError):
            seq = 0  # a damaged last line: ``verify`` will name it; keep appending after it
        return line_hash(last), seq

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size and _ends_without_newline(self.path):
            os.write(fd, b"\n")  # finish a torn last line so the next one starts clean
        return fd

    def append(self, record: dict) -> dict:
        """Write ``record`` plus ``seq``, ``time`` (if absent) and ``prev`` as one line.

        Thread-safe. Returns the record as written. Raises ``OSError`` when the line could not
        be written (disk full, ...): the caller decides whether to answer without a record.
        """
        with self._lock:
            if self._fd is None:  # closed by a previous app shutdown: reopen, same chain
                self._fd = self._open()
            rec = {"seq": self._seq + 1, "time": record.get("time") or now_iso(), **record,
                   "prev": self._prev}
            line = json.dumps(rec, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False).encode() + b"\n"
            if os.fstat(self._fd).st_size + len(line) > self.max_bytes:
                self._rotate()
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(f"audit log {self.path}: short write ({n} of {len(line)} bytes)")
            if self.fsync:
                os.fsync(self._fd)
            self._prev, self._seq = line_hash(line), rec["seq"]
            return rec

    def _rotate(self) -> None:
        if os.fstat(self._fd).st_size == 0:
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        os.close(self._fd)
        os.rename(self.path, target)  # the next line chains to the old file's last line
        self._fd = self._open()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def now_iso() -> str:
    """The time now, ISO 8601 UTC with microseconds (``...Z``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ChainReport:
    """What ``verify`` found: lines checked, the last seq and the head hash (last line's)."""

    files: int
    lines: int
    last_seq: int
    head: str
    starts_at_genesis: bool


def verify(paths: Iterable[str | os.PathLike]) -> ChainReport:
    """Check the chain through ``paths`` (oldest first; one file or a rotated series).

    The first file's first line must start the chain (``prev`` = 64 zeros) unless it was
    rotated from an earlier file not given; then only its continuation is checked and
    ``starts_at_genesis`` is False.

    Raises:
        AuditChainError: the first line (file and 1-based line number) where the chain breaks.
        OSError: a file cannot be read.
    """
    paths = [Path(p) for p in paths]
    prev, seq, n_lines, n_files, genesis = None, None, 0, 0, True
    for path in paths:
        n_files += 1
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                where = f"{path} line {i}"
                try:
                    rec = json.loads(line)
                    rec_prev, rec_seq = rec["prev"], int(rec["seq"])
                except (ValueError, KeyError, TypeError):
                    raise AuditChainError(f"{where}: not an audit record (damaged or "
                                          "edited)") from None
                if prev is None:  # the very first line
                    genesis = rec_prev == GENESIS
                elif rec_prev != prev:
                    before = f"line {i - 1}" if i > 1 else "the previous file's last line"
                    raise AuditChainError(
                        f"{where}: its prev hash does not match {before} ({before} was "
                        "edited, or lines were removed or inserted here)")
                if seq is not None and rec_seq != seq + 1:
                    raise AuditChainError(f"{where}: seq {rec_seq} after {seq} (lines removed "
                                          "or inserted)")
                prev, seq, n_lines = line_hash(line), rec_seq, n_lines + 1
    if n_lines == 0:
        raise AuditChainError("no audit lines in " + ", ".join(map(str, paths)))
    return ChainReport(files=n_files, lines=n_lines, last_seq=seq, head=prev,
                       starts_at_genesis=genesis)
