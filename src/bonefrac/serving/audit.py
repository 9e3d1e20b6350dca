"""The audit log: one JSON line per API request, each line chained to the one before it.

Every line carries ``seq`` (1, 2, ... across rotations) and ``prev``: the SHA-256 (hex) of the
previous line's bytes (without its newline; 64 zeros before the first line ever written). An
edited, inserted or removed line breaks the chain at the next line, which ``verify`` names.
Anyone able to rewrite the whole file can also recompute the chain: keep the head hash that
``bonefrac audit verify`` prints somewhere else (a ticket, a second machine) to anchor it.

Appends are atomic: each line is one ``write`` on an ``O_APPEND`` file (mode 0600) under a
lock, then ``fsync``, so a crash leaves whole lines only. When the file would grow past
``max_bytes`` it is renamed to ``NAME.<UTC time>`` (names that sort in time order) and a new
file continues the chain, so ``bonefrac audit verify NAME.* NAME`` checks the whole history.
With ``keep`` set, only the newest ``keep`` rotated files are kept (older ones are deleted at
rotation, so the disk use is bounded by ``(keep + 1) * max_bytes``); the remaining series
then verifies as a continuation, not from the first record.

Truncation at the end (the last lines removed or the last one edited) leaves a chain that is
still intact: only an anchor kept elsewhere reveals it. With ``anchor_every`` set, every
that-many lines the head (seq and hash) is written to the ``bonefrac.audit`` logger (the
server's log, e.g. journald or syslog); ``verify(..., expect_head=HASH)`` then fails unless
that line is still in the chain.

What a line holds is the caller's choice (``serving.security`` writes time, token name, address,
endpoint, per-file sha256/size/P(fracture)/decision, model id and fingerprint, latency,
status); nothing here looks at pixels.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bonefrac import BonefracError, InputError

GENESIS = "0" * 64
ROTATED_SUFFIX = re.compile(r"\.\d{8}T\d{12}Z")  # NAME.<UTC time> of ``_rotate``
anchor_log = logging.getLogger("bonefrac.audit")


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
                 fsync: bool = True, keep: int | None = None, anchor_every: int = 0):
        """``keep``: rotated files to keep (None: all); ``anchor_every``: log the head hash
        every that many lines (0: never); see the module docstring."""
        if max_bytes < 4096:
            raise InputError("audit log: max_bytes must be >= 4096")
        if (keep is not None and keep < 0) or anchor_every < 0:
            raise InputError("audit log: keep and anchor_every must be >= 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.keep = keep
        self.anchor_every = anchor_every
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
            if self.anchor_every and self._seq % self.anchor_every == 0:
                anchor_log.info("audit head %s seq %d sha256 %s", self.path, self._seq,
                                self._prev)
            return rec

    def _rotate(self) -> None:
        if os.fstat(self._fd).st_size == 0:
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        os.close(self._fd)
        os.rename(self.path, target)  # the next line chains to the old file's last line
        self._fd = self._open()
        if self.keep is not None:
            for old in rotated_files(self.path)[:-self.keep or None]:
                old.unlink(missing_ok=True)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last line written: the value to anchor elsewhere."""
        with self._lock:
            return self._seq, self._prev

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def rotated_files(path: str | os.PathLike) -> list[Path]:
    """The rotated files of the log at ``path`` (``NAME.<UTC time>``), oldest first."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}.*")
                  if ROTATED_SUFFIX.fullmatch(p.name[len(path.name):]))


def _ends_without_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def now_iso() -> str:
    """The time now, ISO 8601 UTC with microseconds (``...Z``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ChainReport:
    """What ``verify`` found: files and lines checked, the first and last seq, the head hash
    (the last line's), whether the chain starts at the first record ever written, and the seq
    of the line whose hash is the expected head (None when none was given)."""

    files: int
    lines: int
    first_seq: int
    last_seq: int
    head: str
    starts_at_genesis: bool
    anchor_seq: int | None = None


def _check_line(line: bytes, path: Path, i: int, prev: str | None, seq: int | None) -> int:
    """The seq of line ``i`` of ``path``, after checking it chains to the line before
    (``prev``, ``seq``; None for the first line). Raises ``AuditChainError``."""
    where = f"{path} line {i}"
    try:
        rec = json.loads(line)
        rec_prev, rec_seq = rec["prev"], int(rec["seq"])
    except (ValueError, KeyError, TypeError):
        raise AuditChainError(f"{where}: not an audit record (damaged or edited)") from None
    if prev is not None and rec_prev != prev:
        before = f"line {i - 1}" if i > 1 else "the previous file's last line"
        raise AuditChainError(f"{where}: its prev hash does not match {before} ({before} was "
                              "edited, or lines were removed or inserted here)")
    if seq is not None and rec_seq != seq + 1:
        raise AuditChainError(f"{where}: seq {rec_seq} after {seq} (lines removed or "
                              "inserted)")
    if prev is None and rec_prev == GENESIS and rec_seq != 1:
        raise AuditChainError(f"{where}: seq {rec_seq} starts the chain (lines removed)")
    return rec_seq


def verify(paths: Iterable[str | os.PathLike], expect_head: str | None = None,
           from_genesis: bool = False) -> ChainReport:
    """Check the chain through ``paths`` (oldest first; one file or a rotated series).

    The first file's first line must start the chain (``prev`` = 64 zeros) unless it was
    rotated from an earlier file not given; then only its continuation is checked and
    ``starts_at_genesis`` is False (an error with ``from_genesis``: lines were dropped at the
    start, or older files are missing). ``expect_head``: a head hash anchored earlier; it must
    be the hash of a line in the chain, else the lines up to it were cut or edited.

    Raises:
        AuditChainError: the first line (file and 1-based line number) where the chain breaks,
            or a failed ``from_genesis`` / ``expect_head`` check.
        OSError: a file cannot be read.
    """
    paths = [Path(p) for p in paths]
    prev = seq = first_seq = first_prev = anchor = None
    n_lines = 0
    for path in paths:
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                seq = _check_line(line, path, i, prev, seq)
                if prev is None:
                    first_seq, first_prev = seq, json.loads(line)["prev"]
                prev, n_lines = line_hash(line), n_lines + 1
                if prev == expect_head:
                    anchor = seq
    if n_lines == 0:
        raise AuditChainError("no audit lines in " + ", ".join(map(str, paths)))
    genesis = first_prev == GENESIS
    if from_genesis and not genesis:
        raise AuditChainError(f"{paths[0]} line 1: seq {first_seq} does not start the chain "
                              "(--from-genesis): the lines before it were removed, or older "
                              "rotated files were not given")
    if expect_head is not None and anchor is None:
        raise AuditChainError(f"the expected head {expect_head} is not in the chain (now "
                              f"{n_lines} lines, head {prev}): lines at or before it were "
                              "removed or edited (truncated log)")
    return ChainReport(files=len(paths), lines=n_lines, first_seq=first_seq, last_seq=seq,
                       head=prev, starts_at_genesis=genesis, anchor_seq=anchor)
