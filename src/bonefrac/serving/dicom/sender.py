"""Sending results by C-STORE or STOW-RS (:mod:`.stow`), with retries and a dead-letter folder.

Results are first written, atomically, to ``outbox/<destination>/<study>/<sop>.dcm``; the
sender thread sends each study folder in one association, deletes each file its destination
acknowledged (success or warning status) and retries the rest after ``retry_seconds`` x 2^k
(k = attempts so far, capped at 5 minutes). After ``retries`` further failed attempts the
folder moves to ``dead-letter/<destination>/<study>/`` with ``reason.json``. Attempts are
counted in ``<study>/.attempts.json``, so a restart neither forgets nor resets them, and a
restarted node sends whatever its outbox still holds. Each destination gets the kinds of
result its ``results`` lists (SR, Secondary Captures, GSPS: :func:`result_kind`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
import threading
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from bonefrac.serving.dicom.config import Destination, NodeConfig
from bonefrac.serving.dicom.stow import stow
from bonefrac.utils import atomic_write, write_json

LOG = logging.getLogger("bonefrac.dicom_node")
ATTEMPTS = ".attempts.json"
MAX_DELAY = 300.0
KIND_OF_CLASS = {ComprehensiveSRStorage: "sr", SecondaryCaptureImageStorage: "sc",
                 GrayscaleSoftcopyPresentationStateStorage: "gsps"}
RESULT_CLASSES = tuple(KIND_OF_CLASS)
SENT_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit / implicit VR LE


class Sender:
    """Drains ``outbox/`` into the configured destinations (one thread)."""

    def __init__(self, config: NodeConfig, root: Path, ae_title: str):
        self.config = config
        self.outbox, self.dead = root / "outbox", root / "dead-letter"
        self.ae = AE(ae_title=ae_title)
        for uid in RESULT_CLASSES:
            self.ae.add_requested_context(uid, list(SENT_SYNTAXES))
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.delivered = 0  # instances acknowledged by a destination (this process)
        # Orders queueing against removing emptied folders and moving them to dead-letter.
        self._lock = threading.Lock()

    def put(self, study: str, objects: list[Dataset]) -> None:
        """Queue ``objects`` for every destination whose ``results`` want their kind: one
        file each, written atomically."""
        with self._lock:
            for dest in self.config.destinations:
                for ds in (d for d in objects if result_kind(d) in dest.results):
                    path = self.outbox / dest.name / study / f"{ds.SOPInstanceUID}.dcm"
                    with atomic_write(path, "wb") as f:
                        ds.save_as(f, enforce_file_format=True)

    def pending(self) -> int:
        """Result files waiting in the outbox."""
        return sum(1 for _ in self.outbox.glob("*/*/*.dcm"))

    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        while not stop.is_set():
            self.send_due()
            stop.wait(poll)

    def send_due(self, now: float | None = None) -> None:
        """One pass over the outbox: each folder whose retry time has come."""
        now = time.time() if now is None else now
        for dest in self.config.destinations:
            root = self.outbox / dest.name
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                state = _attempts(folder)
                if now >= state.get("next", 0.0):
                    self._send_folder(dest, folder, state)

    def _send_folder(self, dest: Destination, folder: Path, state: dict) -> None:
        files = sorted(folder.glob("*.dcm"))
        error = self._send(dest, files) if files else ""
        if not error:
            self._remove_if_empty(folder)
            return
        n = int(state.get("n", 0)) + 1
        LOG.warning("sending %s to %s failed (attempt %d): %s", folder.name, dest.name, n, error)
        if n > self.config.send_retries:
            target = self.dead / dest.name / folder.name
            with self._lock:
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(folder, target)
            write_json(target / "reason.json", {"destination": dest.name, "attempts": n,
                                                "last_error": error})
            LOG.error("%s to %s: gave up after %d attempts -> %s", folder.name, dest.name, n,
                      target)
            return
        delay = min(MAX_DELAY, self.config.retry_seconds * 2 ** (n - 1))
        write_json(folder / ATTEMPTS, {"n": n, "next": time.time() + delay, "last_error": error})

    def _remove_if_empty(self, folder: Path) -> None:
        """Drop a sent folder unless results were queued into it meanwhile."""
        with self._lock:
            if not any(folder.glob("*.dcm")):
                shutil.rmtree(folder, ignore_errors=True)

    def _send(self, dest: Destination, files: list[Path]) -> str:
        """Send ``files`` (STOW-RS or C-STORE); delete each one the destination stored. ''
        when all were, else the first error."""
        if dest.url:
            stored, error = stow(dest, files, self._https(dest))
            for f in files:
                if f.stem in stored:
                    f.unlink()
                    self.delivered += 1
            return error
        return self._c_store(dest, files)

    def _c_store(self, dest: Destination, files: list[Path]) -> str:
        """C-STORE ``files`` in one association; delete each acknowledged one. '' when all
        were, else the first error."""
        assoc = self.ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                  tls_args=self._tls(dest))
        if not assoc.is_established:
            return "association rejected, aborted or never connected"
        error = ""
        try:
            for f in files:
                status = assoc.send_c_store(dcmread(f))
                code = getattr(status, "Status", None)
                if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                    f.unlink()
                    self.delivered += 1
                else:
                    error = error or (f"{f.name}: status 0x{code:04X}" if code is not None
                                      else f"{f.name}: no response (timeout or abort)")
                    if not assoc.is_established:
                        break
        finally:
            if assoc.is_established:
                assoc.release()
        return error

    def _tls(self, dest: Destination):
        """``(context, server name)`` for a ``tls = true`` destination, else None."""
        return (self._client_context(), dest.host) if dest.tls else None

    def _https(self, dest: Destination) -> ssl.SSLContext | None:
        """The context for an https STOW-RS URL, else None."""
        return self._client_context() if dest.url.startswith("https:") else None

    def _client_context(self) -> ssl.SSLContext:
        """Verifies the server against [tls] ca (else the system CAs); the node's certificate
        is the client certificate when [tls] has one."""
        tls = self.config.tls
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls and tls.ca else None)
        if tls is not None:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        return ctx


def result_kind(ds: Dataset) -> str:
    """"sr", "sc" or "gsps" (a destination's ``results``) for a result dataset."""
    return KIND_OF_CLASS[str(ds.SOPClassUID)]


def _attempts(folder: Path) -> dict:
    try:
        return json.loads((folder / ATTEMPTS).read_text())
    except (FileNotFoundError, ValueError):
        return {}
