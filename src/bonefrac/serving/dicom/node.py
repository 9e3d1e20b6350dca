"""The DICOM node: a pynetdicom Application Entity that receives studies and sends results.

- **Association**: only the calling AE titles of ``allowed_callers``, each from its own
  addresses, calling this node's AE title; anything else is rejected (A-ASSOCIATE-RJ,
  "calling AE title not recognised") before any data flows. Optional TLS.
- **C-ECHO**; **C-STORE** of the single-frame image classes in :data:`STORAGE_CLASSES`, in every
  transfer syntax pydicom can decode here (:func:`decodable_syntaxes`). Each instance is
  spooled (:mod:`.spool`) before the success status is sent; an instance bonefrac cannot read
  (:func:`unreadable_reason`), one too large or one that does not parse gets a failure status
  and is kept in ``quarantine/`` with the reason.
- **Studies**: when a study has received nothing for ``settle_seconds``, its images go through
  ``predict_files`` exactly as ``bonefrac predict --explain`` would, are aggregated
  (:mod:`bonefrac.inference.study`), and the SR, Secondary Captures (:mod:`.results`) and
  presentation states (:mod:`.presentation`) go to the outbox, which :class:`.sender.Sender`
  drains into the destinations (each gets the kinds its ``results`` lists).
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import ssl
import threading
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from bonefrac.inference.ensemble import Ensemble
from bonefrac.inference.predict import _decode, model_info, predict_files
from bonefrac.inference.study import aggregate
from bonefrac.serving.dicom.config import NodeConfig
from bonefrac.serving.dicom.presentation import build_gsps, has_own_window
from bonefrac.serving.dicom.results import ModelIdentity, build_sc, build_sr, detections_of
from bonefrac.serving.dicom.sender import Sender
from bonefrac.serving.dicom.spool import Batch, Spool, receive, valid_uid
from bonefrac.utils import display_path, write_json

LOG = logging.getLogger("bonefrac.dicom_node")
# Single-frame projection radiography and captures (bonefrac refuses multi-frame objects).
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.1": "X-Ray Angiographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.12.2": "X-Ray Radiofluoroscopic Image Storage",
}
STUDY_WORKERS = 2  # studies processed at once (see DicomNode._work)
OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0xA700, 0xC000
REJECT_PERMANENT, REJECT_SOURCE_USER, REJECT_CALLING_AET = 0x01, 0x01, 0x03


def decodable_syntaxes() -> list[str]:
    """The transfer syntaxes pydicom has a working pixel decoder for in this install."""
    from pydicom.pixels.decoders.base import get_decoder

    out = []
    for ts in AllTransferSyntaxes:
        try:
            if get_decoder(ts).is_available:
                out.append(str(ts))
        except NotImplementedError:
            pass
    return out


def unreadable_reason(path: Path, ens: Ensemble) -> str:
    """'' when bonefrac can decode ``path`` for ``ens`` (its input sizes and resizing), else
    the reason.

    The one place the node checks readability at C-STORE time: it decodes through the same
    function as prediction (``bonefrac.inference.predict._decode``).
    """
    _, reason = _decode(path, sorted(ens.sizes), ens.resize)
    return reason


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO
    return ds


class DicomNode:
    """The node: :meth:`start` listens and starts the worker and sender threads."""

    def __init__(self, config: NodeConfig, ens: Ensemble, *, poll_seconds: float = 0.25,
                 workers: int | None = None):
        self.config, self.ens = config, ens
        self.spool = Spool(config.spool)
        self.model = ModelIdentity.from_info(model_info(ens))
        self.sender = Sender(config, self.spool.root, config.ae_title)
        self.poll, self.workers = poll_seconds, workers
        self.max_bytes = int(config.max_instance_mb * 2**20)
        self.stats = {"received": 0, "refused": 0, "rejected_associations": 0, "studies": 0}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self.ae = self._make_ae()

    # ------------------------------------------------------------------------- lifecycle
    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = 16
        syntaxes = decodable_syntaxes()
        ae.add_supported_context(Verification)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, syntaxes)
        return ae

    def start(self) -> None:
        """Listen on ``host:port`` (non-blocking) and start the processing and sender threads;
        batches a previous run left unfinished are processed first."""
        self.spool.acquire()
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_ECHO, lambda e: 0),
                    (evt.EVT_C_STORE, self._on_store)]
        try:
            self._server = self.ae.start_server((self.config.host, self.config.port),
                                                block=False, evt_handlers=handlers,
                                                ssl_context=self._ssl_context())
        except BaseException:  # e.g. the port is taken: leave the spool free
            self.spool.close()
            raise
        targets = [(f"bonefrac-node-worker-{i}", self._work) for i in range(STUDY_WORKERS)]
        for name, target in [*targets, ("bonefrac-node-sender", self.sender.run)]:
            t = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        LOG.info("%s listening on %s:%d", self.config.ae_title, self.config.host,
                 self.port)

    @property
    def port(self) -> int:
        """The port listened on (the real one when the config says 0)."""
        return self._server.server_address[1] if self._server else self.config.port

    def stop(self) -> None:
        """Stop listening, then let the threads finish their current step."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self.spool.close()

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(tls.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # --------------------------------------------------------------------- network events
    def _on_requested(self, event) -> None:
        """Reject a caller that is not allowed from where it calls."""
        aet = event.assoc.requestor.primitive.calling_ae_title  # ae_title is set only later
        address = event.assoc.requestor.address
        if not self.config.caller_allowed(aet, address):
            self.stats["rejected_associations"] += 1
            LOG.warning("rejected association from %r at %s (not in allowed_callers)", aet,
                        address)
            event.assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SOURCE_USER,
                                         REJECT_CALLING_AET)

    def _on_store(self, event):
        """C-STORE: spool, or refuse with a failure status and quarantine."""
        sop = str(event.request.AffectedSOPInstanceUID)
        context = {"calling_ae": event.assoc.requestor.ae_title,
                   "address": event.assoc.requestor.address,
                   "sop_class_uid": str(event.request.AffectedSOPClassUID)}
        try:
            data = event.encoded_dataset()
            if len(data) > self.max_bytes:
                return self._refuse(None, sop, OUT_OF_RESOURCES, f"dataset of {len(data):,} "
                                    f"bytes is over max_instance_mb", context)
            study, series, reason = _uids(data, sop)
            if reason:
                return self._refuse(data, sop, CANNOT_UNDERSTAND, reason, context)
            reason = receive(self.spool, data, study, series, sop,
                             lambda p: unreadable_reason(p, self.ens), **context)
        except OSError as e:  # disk full, spool unwritable: the sender must retry later
            LOG.error("cannot spool %s: %s", sop, e)
            return _status(OUT_OF_RESOURCES, f"cannot spool: {e.strerror or e}")
        if reason:
            self.stats["refused"] += 1
            LOG.warning("refused %s: %s", sop, reason)
            return _status(CANNOT_UNDERSTAND, reason)
        self.stats["received"] += 1
        return 0x0000

    def _refuse(self, data: bytes | None, sop: str, code: int, reason: str, context: dict):
        self.stats["refused"] += 1
        LOG.warning("refused %s: %s", sop, reason)
        tmp = self.spool.write_tmp(data) if data is not None else None
        self.spool.quarantine(tmp, sop, reason, **context)
        return _status(code, reason)

    # --------------------------------------------------------------------------- studies
    def _work(self, stop: threading.Event) -> None:
        """One study worker: unfinished batches of a previous run first, then settled studies.
        ``STUDY_WORKERS`` of these run at once, so that one thread's ONNX Runtime inference
        (which releases the GIL) overlaps another's result building (Python)."""
        while (batch := self.spool.claim_unfinished()) is not None:
            self._process_safely(batch)
        while not stop.is_set():
            for study in self.spool.settled(self.config.settle_seconds):
                batch = self.spool.claim(study)
                if batch is not None:
                    self._process_safely(batch)
                if stop.is_set():
                    return
            stop.wait(self.poll)

    def _process_safely(self, batch: Batch) -> None:
        try:
            self.process(batch)
        except Exception as e:  # keep the images, keep the node up
            LOG.exception("study %s failed", batch.study)
            target = self.spool.path("failed") / f"{batch.study}-{time.time_ns()}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(batch.folder), target)
            write_json(target / "reason.json", {"error": f"{type(e).__name__}: {e}"})
        finally:
            self.spool.release(batch)

    def process(self, batch: Batch) -> None:
        """Predict a batch, queue its SR and Secondary Captures, log its rows, mark it done."""
        files = batch.instances()
        res = predict_files(self.ens, files, explain=True,
                            heatmap_dir=batch.folder / ".heatmaps", progress=False,
                            workers=self.workers)
        paths = {display_path(f): f for f in files}
        headers = {k: dcmread(f, stop_before_pixels=True) for k, f in paths.items()}
        sources = [headers[r["file"]] for r in res.rows]
        for e in res.errors:
            LOG.warning("study %s: %s: %s", batch.study, e["file"], e["reason"])
        record = {"errors": res.errors}
        if res.rows:
            study = aggregate(batch.study, res.rows)
            objects = self.results(res.rows, [paths[r["file"]] for r in res.rows], sources,
                                   study)
            self.sender.put(batch.study, objects)
            self._log(batch, res.rows, sources, study)
            record.update(results=[str(o.SOPInstanceUID) for o in objects])
        self.spool.finish(batch, [h.SOPInstanceUID for h in headers.values()], **record)
        self.stats["studies"] += 1
        LOG.info("study %s: %d image(s) predicted, %d failed", batch.study, len(res.rows),
                 len(res.errors))

    def results(self, rows: list[dict], files: list[Path], sources: list[Dataset],
                study: dict) -> list[Dataset]:
        """The result objects some destination wants: the SR, one Secondary Capture per
        image with an overlay, one GSPS per image. ``sources[i]``: the header of
        ``files[i]``, whose row is ``rows[i]``."""
        wanted = {k for d in self.config.destinations for k in d.results}
        box_threshold = float(getattr(self.ens, "box_threshold", 0.0))
        triples = list(enumerate(zip(rows, sources, strict=True)))
        objects = []
        if "sr" in wanted:
            objects.append(build_sr(rows, sources, study, self.model, box_threshold))
        if "sc" in wanted:
            objects += [build_sc(Path(r["heatmap"]), s, self.model, i)
                        for i, (r, s) in triples if r.get("heatmap")]
        if "gsps" in wanted:  # grayscale images only (a colour one has no GSPS); pixels
            # only where the window must be worked out from them
            objects += [build_gsps(r, s if has_own_window(s) else dcmread(files[i]),
                                   self.model, i, box_threshold)
                        for i, (r, s) in triples if s.get("SamplesPerPixel", 1) == 1]
        return objects

    def _log(self, batch: Batch, rows: list[dict], sources: list[Dataset], study: dict) -> None:
        """The rows, with their UIDs (and patient name/ID only when configured), to
        ``log/predictions.csv``, ``log/studies.csv`` and ``log/<study>_<n>.json``; each
        image's boxes (all the model kept, shown or not) to ``log/detections.csv``, one row
        per box (:data:`bonefrac.inference.detections.DETECTION_COLUMNS` and the UIDs)."""
        logged = []
        for r, s in zip(rows, sources, strict=True):
            row = {"study_instance_uid": s.StudyInstanceUID,
                   "series_instance_uid": s.SeriesInstanceUID,
                   "sop_instance_uid": s.SOPInstanceUID, **r}
            row.pop("heatmap", None)
            row["file"] = f"{s.SeriesInstanceUID}/{s.SOPInstanceUID}.dcm"
            if self.config.log_patient_names:
                row.update(patient_id=str(s.get("PatientID", "")),
                           patient_name=str(s.get("PatientName", "")))
            logged.append(row)
        log = self.spool.path("log")
        boxes = [{"file": row["file"], "sop_instance_uid": row["sop_instance_uid"], **d}
                 for row, r in zip(logged, rows, strict=True) for d in detections_of(r)]
        _append_csv(log / "predictions.csv",
                    [{k: v for k, v in row.items() if k != "detections"} for row in logged])
        _append_csv(log / "detections.csv", boxes)
        _append_csv(log / "studies.csv", [study])
        n = len(self.spool.done_record(batch.study).get("batches", [])) + 1
        write_json(log / f"{batch.study}_{n}.json",
                   {**model_info(self.ens), "study": study, "predictions": logged})


def _uids(data: bytes, sop: str) -> tuple[str, str, str]:
    """(study, series, '') from the dataset's header, or ('', '', reason)."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True,
                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        own = str(ds.SOPInstanceUID)
    except Exception as e:
        return "", "", f"malformed dataset ({type(e).__name__}: {e})"[:200]
    bad = [n for n, u in (("study", study), ("series", series), ("SOP instance", own))
           if not valid_uid(u)]
    if bad:
        return "", "", f"invalid {', '.join(bad)} UID"
    if own != sop:
        return "", "", "SOP Instance UID differs from the C-STORE request's"
    return study, series, ""


_CSV_LOCK = threading.Lock()


def _append_csv(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` in one write (header first when the file is new)."""
    if not rows:
        return
    with _CSV_LOCK:
        new = not path.exists() or path.stat().st_size == 0
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
        with open(path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
