"""Load test of ``bonefrac dicom-node`` on loopback: throughput, nothing lost, every result
delivered, also when the node is killed (SIGKILL) mid-load and restarted.

Makes ``--instances`` DX instances from the real radiographs in tests/data (new UIDs, studies of
``--per-study`` images, each study sent over one association), starts the real node in a
subprocess (``python -m bonefrac dicom-node``) with a pynetdicom Storage SCP of this process
as its destination, and sends them over ``--associations`` concurrent associations. A sender
counts an instance as acknowledged only on status 0x0000 and resends anything else after
reconnecting. Two runs:

- ``steady``: C-STORE rate (instances/s while sending) and end to end (first send to the last
  result received: instances/s);
- ``kill_restart``: the node is SIGKILLed once ``--kill-at`` of the instances are acknowledged,
  restarted over the same spool 1 s later, and the senders carry on.

Each run checks that every acknowledged instance has its Secondary Capture and its GSPS and is
in an SR at the destination (``lost`` = acknowledged instances without all three), that no
result object arrived twice (``duplicates``), and that the spool ends with nothing pending, in
the outbox, dead-lettered or failed. Prints ONE JSON object on stdout
(progress on stderr); exit 0 when both runs lose nothing and deliver everything, else 1.

    python benchmarks/dicom_node_load.py                         # 500 instances, 4 associations
    python benchmarks/dicom_node_load.py --instances 100 --associations 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from bonefrac.testing import free_port

ROOT = Path(__file__).resolve().parent.parent

IMAGES = sorted((ROOT / "tests" / "data").rglob("*.jpg"))
DX = DigitalXRayImageStorageForPresentation


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_instances(folder: Path, n: int, per_study: int) -> list[list[Path]]:
    """``n`` DX files in studies of ``per_study``: a list of studies, each a list of files."""
    pixels = [np.asarray(Image.open(p).convert("L")) for p in IMAGES]
    studies, current = [], []
    for i in range(n):
        if i % per_study == 0:
            study, series, current = generate_uid(), generate_uid(), []
            studies.append(current)
        a = pixels[i % len(pixels)]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "DX"
        ds.PatientName, ds.PatientID = "Load^Test", f"L{i // per_study}"
        ds.Rows, ds.Columns = a.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = a.tobytes()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        current.append(path)
    return studies


class Receiver:
    """The destination: records which source instances have an SC and a GSPS and are in an
    SR, and how often each result object arrived."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sc_sources: set[str] = set()
        self.sr_sources: set[str] = set()
        self.pr_sources: set[str] = set()
        self.objects: set[str] = set()
        self.received = 0
        ae = AE(ae_title="RESULTS")
        for uid in (ComprehensiveSRStorage, SecondaryCaptureImageStorage,
                    GrayscaleSoftcopyPresentationStateStorage):
            ae.add_supported_context(uid)
        ae.maximum_associations = 8
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        ds = event.dataset
        with self.lock:
            self.received += 1
            self.objects.add(ds.SOPInstanceUID)
            if ds.SOPClassUID == SecondaryCaptureImageStorage:
                self.sc_sources.add(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            elif ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage:
                series = ds.ReferencedSeriesSequence[0]
                self.pr_sources.add(series.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
            else:
                for study in ds.CurrentRequestedProcedureEvidenceSequence:
                    for series in study.ReferencedSeriesSequence:
                        self.sr_sources.update(i.ReferencedSOPInstanceUID
                                               for i in series.ReferencedSOPSequence)
        return 0x0000

    def delivered(self, uids: set[str]) -> set[str]:
        with self.lock:
            return uids & self.sc_sources & self.sr_sources & self.pr_sources


class Senders:
    """``k`` threads, each sending its studies over its own association until all are
    acknowledged (reconnecting after any failure)."""

    def __init__(self, port: int, studies: list[list[Path]], k: int):
        self.port, self.lock = port, threading.Lock()
        self.acked: dict[str, float] = {}
        self.uid = {f: dcmread(f, stop_before_pixels=True).SOPInstanceUID
                    for s in studies for f in s}
        self.parts = [[f for s in studies[i::k] for f in s] for i in range(k)]
        self.threads = [threading.Thread(target=self._run, args=(p,), daemon=True)
                        for p in self.parts]
        self.failures = 0

    def start(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()
        return time.monotonic() - self.t0

    def n_acked(self) -> int:
        with self.lock:
            return len(self.acked)

    def _run(self, files: list[Path]) -> None:
        ae = AE(ae_title="LOADGEN")
        ae.add_requested_context(DX, ExplicitVRLittleEndian)
        todo = list(files)
        while todo:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="BONEFRAC")
            if not assoc.is_established:
                self.failures += 1
                time.sleep(0.3)
                continue
            while todo and assoc.is_established:
                status = assoc.send_c_store(dcmread(todo[0]))
                if getattr(status, "Status", None) == 0:
                    with self.lock:
                        self.acked[self.uid[todo[0]]] = time.monotonic()
                    todo.pop(0)
                else:
                    self.failures += 1
                    break
            if assoc.is_established:
                assoc.release()


def start_node(config: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "bonefrac", "dicom-node", "--config",
                                 str(config), "--log-level", "warning"],
                                stdout=f, stderr=subprocess.STDOUT)
    return proc


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit("the node did not start listening")


def spool_state(spool: Path) -> dict[str, int]:
    return {"pending": sum(1 for s in ("incoming", "processing")
                           for _ in (spool / s).glob("*/*/*.dcm")),
            "outbox": sum(1 for _ in (spool / "outbox").glob("*/*/*.dcm")),
            "dead_letter": sum(1 for _ in (spool / "dead-letter").glob("*/*/*.dcm")),
            "failed": sum(1 for _ in (spool / "failed").glob("*")) if (spool / "failed").is_dir()
            else 0,
            "quarantined": sum(1 for _ in (spool / "quarantine").glob("*.json"))}


def one_run(work: Path, studies: list[list[Path]], args, kill_at: float | None) -> dict:
    receiver, port = Receiver(), free_port()
    spool = work / "spool"
    config = work / "node.toml"
    config.write_text("\n".join([
        f'spool = "{spool}"', 'ae_title = "BONEFRAC"', 'host = "127.0.0.1"', f"port = {port}",
        f"settle_seconds = {args.settle}", "[allowed_callers]", 'LOADGEN = ["127.0.0.1"]',
        "[send]", "retries = 20", "retry_seconds = 0.5",
        "[[destinations]]", 'ae_title = "RESULTS"', 'host = "127.0.0.1"',
        f"port = {receiver.port}"]) + "\n")
    node = start_node(config, work / "node.log")
    wait_listening(port, node)
    senders = Senders(port, studies, args.associations)
    uids = set(senders.uid.values())
    senders.start()
    killed = None
    if kill_at is not None:
        while senders.n_acked() < kill_at * len(uids):
            time.sleep(0.05)
        killed = senders.n_acked()
        node.send_signal(signal.SIGKILL)
        node.wait()
        log(f"  killed the node after {killed} acknowledged instances; restarting in 1 s")
        time.sleep(1.0)
        node = start_node(config, work / "node.log")
        wait_listening(port, node)
    store_s = senders.join()
    log(f"  all {len(uids)} acknowledged in {store_s:.1f} s; waiting for the results")
    end = time.monotonic() + args.timeout
    while len(receiver.delivered(uids)) < len(uids) and time.monotonic() < end:
        time.sleep(0.2)
    e2e = time.monotonic() - senders.t0
    time.sleep(1.0)  # let the node finish its bookkeeping before reading the spool
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=60)
    receiver.server.shutdown()
    acked = set(senders.acked)
    delivered = receiver.delivered(uids)
    return {"instances": len(uids), "acknowledged": len(acked),
            "store_seconds": round(store_s, 2),
            "store_instances_per_s": round(len(uids) / store_s, 2),
            "end_to_end_seconds": round(e2e, 2),
            "end_to_end_instances_per_s": round(len(uids) / e2e, 2),
            "results_received": receiver.received,
            "distinct_result_objects": len(receiver.objects),
            "duplicates": receiver.received - len(receiver.objects),
            "lost": len(acked - delivered), "delivered_all": delivered == uids,
            "send_failures_seen_by_senders": senders.failures,
            "killed_after_acknowledged": killed, "spool_at_end": spool_state(spool)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=500)
    p.add_argument("--associations", type=int, default=4)
    p.add_argument("--per-study", type=int, default=4, help="images per study")
    p.add_argument("--settle", type=float, default=1.0, help="the node's settle_seconds")
    p.add_argument("--kill-at", type=float, default=0.4,
                   help="kill the node once this fraction of instances is acknowledged")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for results")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bonefrac_node_load_") as tmp:
        tmp = Path(tmp)
        out = {"instances": args.instances, "associations": args.associations,
               "per_study": args.per_study, "settle_seconds": args.settle,
               "cpus": os.cpu_count()}
        for name, kill in (("steady", None), ("kill_restart", args.kill_at)):
            work = tmp / name
            (work / "in").mkdir(parents=True)
            studies = make_instances(work / "in", args.instances, args.per_study)
            log(f"{name}: {args.instances} instances in {len(studies)} studies")
            out[name] = one_run(work, studies, args, kill)
    ok = all(out[r]["lost"] == 0 and out[r]["delivered_all"] for r in ("steady", "kill_restart"))
    out["ok"] = ok
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
