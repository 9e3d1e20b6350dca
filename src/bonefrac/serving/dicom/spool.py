"""The node's spool: nothing acknowledged is lost, nothing is processed twice.

Layout under the spool folder::

    incoming/<study>/<series>/<sop>.dcm   received, acknowledged, waiting for the study to settle
    incoming/<study>/.last                touched at each receipt (its mtime is the settle clock)
    processing/<study>/...                a claimed batch (moved from incoming/ in one rename)
    done/<study>.json                     SOP Instance UIDs processed, results, errors
    quarantine/<sop>.dcm + <sop>.json     refused instances and why
    outbox/, dead-letter/                 results to send, and those that could not be sent
    log/                                  predictions.csv, detections.csv, studies.csv,
                                          <study>_<n>.json

An instance is written to ``tmp/`` (fsync), checked, then renamed into ``incoming/`` before the
C-STORE success status goes back. A claimed batch moves to ``processing/`` in one rename, so
images arriving meanwhile start a new batch; a node that stops mid-batch finds it there on
restart and processes it again (its results get the same UIDs). A SOP Instance UID already in
``incoming/``, ``processing/`` or ``done/`` is acknowledged again without change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bonefrac.utils import publish, write_json

# PS3.5 9.1: a UID is digits and dots, at most 64 characters; anything else never becomes a
# path component (no traversal through a crafted UID).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LAST = ".last"


def valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and len(uid) <= 64 and bool(_UID.match(uid))


@dataclass(frozen=True)
class Batch:
    """A claimed study batch: its folder under ``processing/``."""

    study: str
    folder: Path

    def instances(self) -> list[Path]:
        """The batch's files, sorted (series, then SOP Instance UID)."""
        return sorted(p for p in self.folder.glob("*/*.dcm"))


class Spool:
    """The folders above, with the one lock that orders receipts against claims."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for name in ("tmp", "incoming", "processing", "done", "quarantine", "outbox",
                     "dead-letter", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._active: set[str] = set()  # studies a worker thread is processing now

    def acquire(self) -> None:
        """Take the spool for this process (one node per spool: a second one would process
        the same batches) and drop the half-written files an earlier run left in ``tmp/``
        (never acknowledged). Raises OSError naming the spool when another node holds it."""
        self._lockfile = open(self.root / ".lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise OSError(f"spool {self.root} is in use by another bonefrac dicom-node") from None
        for f in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                f.unlink()

    def close(self) -> None:
        lock = getattr(self, "_lockfile", None)
        if lock is not None:
            lock.close()  # releases the flock
            self._lockfile = None

    def path(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------------ receiving
    def write_tmp(self, data: bytes) -> Path:
        """``data`` in a new fsynced file under ``tmp/``."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".dcm")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    def seen(self, study: str, sop: str) -> bool:
        """Whether ``sop`` of ``study`` is already spooled, being processed or done."""
        for state in ("incoming", "processing"):
            if any((self.root / state / study).glob(f"*/{sop}.dcm")):
                return True
        return sop in self.done_record(study).get("sop_instance_uids", [])

    def accept(self, tmp: Path, study: str, series: str, sop: str) -> Path:
        """Move a checked ``tmp`` file into ``incoming/`` (durably) and restart the study's
        settle clock. Returns its path."""
        with self._lock:
            folder = self.root / "incoming" / study / series
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{sop}.dcm"
            publish(tmp, dest)
            _fsync_dir(folder)
            (self.root / "incoming" / study / LAST).touch()
        return dest

    def quarantine(self, tmp: Path | None, sop: str, reason: str, **context) -> None:
        """Keep a refused instance (when there are bytes) and its reason."""
        q = self.root / "quarantine"
        name = sop if valid_uid(sop) else f"invalid-uid-{time.time_ns()}"
        if tmp is not None:
            publish(tmp, q / f"{name}.dcm")
        write_json(q / f"{name}.json", {"sop_instance_uid": str(sop), "reason": reason,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        **context})

    # ----------------------------------------------------------------------- processing
    def settled(self, settle_seconds: float, now: float | None = None) -> list[str]:
        """Studies in ``incoming/`` quiet for at least ``settle_seconds``, oldest first."""
        now = time.time() if now is None else now
        quiet = []
        for d in (self.root / "incoming").iterdir():
            with contextlib.suppress(FileNotFoundError):
                try:
                    last = (d / LAST).stat().st_mtime
                except FileNotFoundError:  # stopped between an accept and its touch
                    last = d.stat().st_mtime
                if now - last >= settle_seconds:
                    quiet.append((last, d.name))
        return [s for _, s in sorted(quiet)]

    def claim(self, study: str) -> Batch | None:
        """Move ``incoming/<study>`` to ``processing/`` (one rename, under the receipt lock),
        behind any earlier unfinished batch of the same study. None when there is nothing to
        claim or another thread is processing this study (call :meth:`release` when done)."""
        with self._lock:
            src = self.root / "incoming" / study
            if study in self._active or not src.is_dir():
                return None
            self._active.add(study)
            dest = self.root / "processing" / study
            if dest.exists():  # a batch left from before a restart: process it first
                return Batch(study, dest)
            os.replace(src, dest)
            _fsync_dir(dest.parent)
        return Batch(study, dest)

    def claim_unfinished(self) -> Batch | None:
        """A batch a previous run claimed and did not finish, if one is left unclaimed."""
        with self._lock:
            for d in sorted((self.root / "processing").iterdir()):
                if d.is_dir() and d.name not in self._active:
                    self._active.add(d.name)
                    return Batch(d.name, d)
        return None

    def release(self, batch: Batch) -> None:
        with self._lock:
            self._active.discard(batch.study)

    def done_record(self, study: str) -> dict:
        try:
            return json.loads((self.root / "done" / f"{study}.json").read_text())
        except FileNotFoundError:
            return {}

    def finish(self, batch: Batch, sops: list[str], **record) -> None:
        """Record the batch's SOP Instance UIDs as done, then drop its folder."""
        old = self.done_record(batch.study)
        merged = sorted(set(old.get("sop_instance_uids", [])) | set(sops))
        batches = old.get("batches", []) + [{**record, "n": len(sops),
                                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        write_json(self.root / "done" / f"{batch.study}.json",
                   {"study_instance_uid": batch.study, "sop_instance_uids": merged,
                    "batches": batches})
        shutil.rmtree(batch.folder)

    def pending(self) -> int:
        """Instances acknowledged and not yet processed."""
        return sum(1 for state in ("incoming", "processing")
                   for _ in (self.root / state).glob("*/*/*.dcm"))


def receive(spool: Spool, data: bytes, study: str, series: str, sop: str,
            check: Callable[[Path], str], **context) -> str:
    """Spool one instance: '' when it is stored (or already was), else why it was refused
    (then it is in ``quarantine/``). ``check(path)`` returns '' or a reason."""
    if spool.seen(study, sop):
        return ""
    tmp = spool.write_tmp(data)
    try:
        reason = check(tmp)
        if reason:
            spool.quarantine(tmp, sop, reason, **context)
            return reason
        spool.accept(tmp, study, series, sop)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return ""


def _fsync_dir(folder: Path) -> None:
    """Make a rename into ``folder`` durable (POSIX: fsync the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
