"""The DICOM node against real peers: a real Orthanc (Debian's package, started here with its own
config, ports and storage) and pynetdicom peers on loopback, with real radiographs from
tests/data converted to DX DICOM.

Needs ``scripts/install_orthanc.sh`` (orthanc + dcmtk) for the Orthanc round trip; without it
that test is skipped, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, real_images

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from PIL import Image  # noqa: E402
from pydicom import Dataset, dcmread  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    Verification,
)

from bonefrac.cli.main import main  # noqa: E402
from bonefrac.inference.ensemble import Ensemble  # noqa: E402
from bonefrac.inference.model_folder import resolve_model  # noqa: E402
from bonefrac.inference.study import RULE, aggregate, study_rows  # noqa: E402
from bonefrac.serving.dicom.config import ConfigError, load_config, parse_config  # noqa: E402
from bonefrac.serving.dicom.node import DicomNode  # noqa: E402

DX = DigitalXRayImageStorageForPresentation
ORTHANC = Path("/usr/sbin/Orthanc")
DSRDUMP = shutil.which("dsrdump")


# ------------------------------------------------------------------------------- helpers
def to_dicom(jpg: Path, path: Path, study: str, series: str, number: int = 1) -> Path:
    """A real radiograph as a DX (For Presentation) file, 8-bit MONOCHROME2."""
    pixels = np.asarray(Image.open(jpg).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Bone", "BF1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.ReferringPhysicianName, ds.Modality = "", "DX"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(folder: Path, n: int, offset: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return [to_dicom(j, folder / f"im{i}.dcm", study, series, i + 1)
            for i, j in enumerate(real_images()[offset:offset + n])]



def wait_for(cond, timeout: float, what: str, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Receiver:
    """A real pynetdicom Storage SCP standing in for a PACS that receives results."""

    def __init__(self, ae_title: str = "RESULTS"):
        self.ae_title, self.received, self.lock = ae_title, [], threading.Lock()
        ae = AE(ae_title=ae_title)
        for uid in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification):
            ae.add_supported_context(uid)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def of_class(self, uid: str) -> list[Dataset]:
        with self.lock:
            return [d for d in self.received if d.SOPClassUID == uid]

    def stop(self):
        self.server.shutdown()


def node_config(tmp: Path, dest_port: int, dest_aet: str = "RESULTS", tail: str = "",
                **over) -> Path:
    lines = [f'spool = "{tmp / "spool"}"', 'ae_title = "BONEFRAC"', 'host = "127.0.0.1"',
             f"port = {over.pop('port', 0)}", f"settle_seconds = {over.pop('settle', 0.3)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in over.items() if k != "send"]
    lines += ["[allowed_callers]", 'SENDER = ["127.0.0.1"]', 'ORTHANC = ["127.0.0.1"]',
              "[send]", f"retries = {over.get('send', (3, 0.1))[0]}",
              f"retry_seconds = {over.get('send', (3, 0.1))[1]}",
              "[[destinations]]", f'ae_title = "{dest_aet}"', 'host = "127.0.0.1"',
              f"port = {dest_port}"]
    path = tmp / "node.toml"
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def send(port: int, files: list[Path], aet: str = "SENDER", bind: str | None = None):
    """C-STORE ``files`` to the node; the statuses (None if the association failed)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    kw = {"bind_address": (bind, 0)} if bind else {}
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEFRAC", **kw)
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def echo(port: int, aet: str = "SENDER", tls_args=None) -> bool:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEFRAC", tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def sr_probabilities(sr: Dataset) -> dict[str, float]:
    """{referenced source SOP Instance UID: P(fracture)} from the per-image groups of an SR."""
    out = {}
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in container.ContentSequence:
            items = group.ContentSequence
            probs = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                     if i.ValueType == "NUM"
                     and i.ConceptNameCodeSequence[0].CodeMeaning == "Probability"]
            refs = [i.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for i in items if i.ValueType == "SCOORD"]
            if refs:  # the study group has no region
                out[refs[0]] = probs[0]
    return out


def predicted(files: list[Path], out: Path) -> dict[str, dict]:
    """``bonefrac predict`` on ``files``: {SOP Instance UID: row}."""
    assert main(["predict", *map(str, files), "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    uid = {str(f): dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    return {uid[r["file"]]: r for r in rows}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ens():
    return Ensemble.load(resolve_model("ensemble"), threads=1)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def make_node(ens, tmp_path):
    nodes = []

    def make(config: Path) -> DicomNode:
        node = DicomNode(load_config(config), ens, workers=1)
        node.start()
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop()


# ------------------------------------------------------------------- rule and config
def test_study_rule_is_max_over_images_and_any_fractured():
    rows = [{"file": "a", "prob_fractured": 0.1, "decision": "non_fractured",
             "decision_confirmation": "non_fractured", "threshold": 0.2},
            {"file": "b", "prob_fractured": 0.7, "decision": "fractured",
             "decision_confirmation": "non_fractured", "threshold": 0.2},
            {"file": "c", "prob_fractured": 0.3, "decision": "fractured",
             "decision_confirmation": "non_fractured", "threshold": 0.2}]
    s = aggregate("1.2.3", rows)
    assert (s["prob_fractured"], s["max_file"], s["n_images"]) == (0.7, "b", 3)
    assert s["decision"] == "fractured" and s["decision_confirmation"] == "non_fractured"
    assert s["rule"] == RULE
    # a decision other than the two classes (a gate's "uncertain") keeps a study from being
    # cleared, and never outranks a fractured image
    unsure = [{**rows[0], "decision": "uncertain"}, {**rows[0], "file": "d"}]
    assert aggregate("1.2.4", unsure)["decision"] == "uncertain"
    assert aggregate("1.2.5", [*unsure, rows[1]])["decision"] == "fractured"
    # grouping by study; a file without a study is left out
    out = study_rows(rows, {"a": "1.1", "b": "1.2", "c": "1.1"})
    assert [(r["study_instance_uid"], r["prob_fractured"]) for r in out] == [("1.1", 0.3),
                                                                            ("1.2", 0.7)]


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    base = {"spool": "s", "allowed_callers": {"PACS": ["10.0.0.0/24"]},
            "destinations": [{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}]}
    cfg = parse_config(base, tmp_path)
    assert cfg.spool == tmp_path / "s" and cfg.caller_allowed("PACS", "10.0.0.77")
    assert not cfg.caller_allowed("PACS", "10.0.1.1") and not cfg.caller_allowed("X", "10.0.0.1")
    for bad, word in [({"prot": 1}, "unknown key"), ({"port": 70000}, "port"),
                      ({"allowed_callers": {}}, "allowed_callers"),
                      ({"destinations": []}, "destinations"),
                      ({"ae_title": "A" * 17}, "AE title"),
                      ({"allowed_callers": {"P": ["not-an-ip"]}}, "allowed_callers.P")]:
        with pytest.raises(ConfigError, match=word):
            parse_config({**base, **bad}, tmp_path)
    (tmp_path / "bad.toml").write_text("port = [")
    with pytest.raises(ConfigError, match="bad.toml: not readable TOML"):
        load_config(tmp_path / "bad.toml")


def test_predict_by_study(tmp_path):
    a = make_study(tmp_path / "in" / "a", 2)
    b = make_study(tmp_path / "in" / "b", 1, offset=2)
    shutil.copy(real_images()[3], tmp_path / "in" / "plain.jpg")  # no study
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "--out", str(out), "--by-study",
                 "--quiet"]) == 0
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    studies = json.loads((out / "studies.json").read_text())
    assert studies["rule"] == RULE and len(studies["studies"]) == 2
    by_uid = {s["study_instance_uid"]: s for s in studies["studies"]}
    for files in (a, b):
        uid = dcmread(files[0]).StudyInstanceUID
        mine = [r for r in rows if Path(r["file"]).parent == files[0].parent]
        assert by_uid[uid]["n_images"] == len(files)
        assert by_uid[uid]["prob_fractured"] == max(r["prob_fractured"] for r in mine)
    assert (out / "studies.csv").read_text().count("\n") == 3
    assert main(["predict", str(tmp_path / "in"), "--by-study", "--shard", "1/2",
                 "--out", str(tmp_path / "o2")]) == 1


# ------------------------------------------------------- node against pynetdicom peers
@pytest.mark.slow
def test_node_predicts_a_study_and_delivers_sr_and_captures(make_node, receiver, tmp_path):
    files = make_study(tmp_path / "in", 2)
    node = make_node(node_config(tmp_path, receiver.port))
    assert echo(node.port)
    assert send(node.port, files) == [0, 0]
    assert send(node.port, files[:1]) == [0]  # a repeated instance: acknowledged, no change
    wait_for(lambda: len(receiver.of_class(SecondaryCaptureImageStorage)) == 2
             and receiver.of_class(ComprehensiveSRStorage), 60, "the results")
    sr = receiver.of_class(ComprehensiveSRStorage)[0]
    want = predicted(files, tmp_path / "pred")
    assert sr_probabilities(sr) == {k: r["prob_fractured"] for k, r in want.items()}
    study_uid = dcmread(files[0]).StudyInstanceUID
    for ds in receiver.received:
        assert ds.StudyInstanceUID == study_uid and "RESEARCH USE ONLY" in ds.SeriesDescription
    sc = receiver.of_class(SecondaryCaptureImageStorage)[0]
    assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape[2] == 3
    done = json.loads((tmp_path / "spool" / "done" / f"{study_uid}.json").read_text())
    assert len(done["sop_instance_uids"]) == 2 and len(done["batches"]) == 1
    log = (tmp_path / "spool" / "log" / "predictions.csv").read_text()
    assert log.count("\n") == 3 and "Test^Bone" not in log  # no names unless configured
    assert node.spool.pending() == 0 and node.sender.pending() == 0


def test_node_rejects_unknown_callers_and_refuses_bad_data(make_node, receiver, tmp_path):
    node = make_node(node_config(tmp_path, receiver.port, max_instance_mb=0.2))
    good = make_study(tmp_path / "in", 1)
    minimal = dcmread(good[0])  # without the Type 2 patient/study attributes: still served
    for key in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyID", "AccessionNumber"):
        delattr(minimal, key)
    minimal.save_as(good[0], enforce_file_format=True)
    assert send(node.port, good, aet="STRANGER") is None  # unknown calling AE
    assert send(node.port, good, bind="127.0.0.2") is None  # allowed AE, wrong address
    assert node.stats["rejected_associations"] == 2
    # pixel data cut short: parses, cannot be decoded -> failure status + quarantine
    broken = dcmread(good[0])
    broken.PixelData = broken.PixelData[:100]
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    big = dcmread(good[0])
    big.Rows, big.Columns = 600, 600
    big.PixelData = bytes(600 * 600)
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    statuses = send(node.port, [tmp_path / "broken.dcm", tmp_path / "big.dcm", good[0]])
    assert statuses[0] == 0xC000 and statuses[1] == 0xA700 and statuses[2] == 0
    reason = json.loads((tmp_path / "spool" / "quarantine" /
                         f"{broken.SOPInstanceUID}.json").read_text())
    assert reason["calling_ae"] == "SENDER" and "pixel" in reason["reason"].lower()
    assert (tmp_path / "spool" / "quarantine" / f"{broken.SOPInstanceUID}.dcm").is_file()
    assert echo(node.port)  # still up
    wait_for(lambda: receiver.of_class(ComprehensiveSRStorage), 60, "the good image's SR")


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_tls_associations_only(make_node, receiver, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True,
                   capture_output=True)
    node = make_node(node_config(tmp_path, receiver.port,
                                 tail=f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assert echo(node.port, tls_args=(ctx, "localhost"))
    assert not echo(node.port)  # plain TCP is not spoken


@pytest.mark.slow
def test_restart_finishes_the_spool_and_dead_letters_what_cannot_be_sent(
        ens, receiver, tmp_path):
    files = make_study(tmp_path / "in", 1)
    closed = free_port()  # nobody listens there
    first = DicomNode(load_config(node_config(tmp_path, closed, settle=3600)), ens, workers=1)
    first.start()
    assert send(first.port, files) == [0]
    with pytest.raises(OSError, match="in use by another"):  # one node per spool
        DicomNode(load_config(node_config(tmp_path, closed)), ens).start()
    first.stop()  # acknowledged, never processed
    assert first.spool.pending() == 1
    # restarted with a short settle time: processes what the first run acknowledged; the
    # destination is down, so after 1 retry the results go to dead-letter
    cfg = node_config(tmp_path, closed, settle=0.1, send=(1, 0.05))
    second = DicomNode(load_config(cfg), ens, workers=1)
    second.start()
    try:
        dead = tmp_path / "spool" / "dead-letter"
        wait_for(lambda: list(dead.glob("*/*/reason.json")), 60, "the dead letter")
        assert len(list(dead.glob("*/*/*.dcm"))) == 2  # SR + 1 capture, kept
        assert second.spool.pending() == 0
    finally:
        second.stop()


# --------------------------------------------------------------------- the real PACS
def _orthanc_missing() -> str:
    missing = [n for n, ok in (("orthanc", ORTHANC.exists()), ("dcmtk", DSRDUMP)) if not ok]
    return ", ".join(missing)


class Orthanc:
    """A private Orthanc: own config, storage folder and free ports on loopback."""

    def __init__(self, folder: Path, node_port: int, aet: str = "ORTHANC"):
        self.http, self.dicom, self.aet = free_port(), free_port(), aet
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bonefrac-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": False,
            "DicomModalities": {"bonefrac": ["BONEFRAC", "127.0.0.1", node_port]},
            "DicomScuTimeout": 30, "HttpTimeout": 60}
        (folder / "orthanc.json").write_text(json.dumps(config))
        with open(folder / "orthanc.log", "wb") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._alive(), 30, "Orthanc's REST API")

    def _alive(self) -> bool:
        assert self.proc.poll() is None, "Orthanc exited; see orthanc.log"
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def request(self, path: str, data: bytes | None = None, method: str | None = None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data,
                                     method=method)
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get(self, path: str):
        return self.request(path)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.slow
def test_orthanc_round_trip(tmp_path):
    """Upload to Orthanc over REST, Orthanc C-STOREs the study to `bonefrac dicom-node`, the
    SR and captures arrive back in Orthanc in the same study, the SR's probabilities are those
    of `bonefrac predict`, and dcmtk's dsrdump reads the SR."""
    missing = _orthanc_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed: scripts/install_orthanc.sh must run first")
        pytest.skip(f"{missing} not installed (run scripts/install_orthanc.sh)")
    files = make_study(tmp_path / "in", 2)
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    config = node_config(tmp_path, orthanc.dicom, dest_aet="ORTHANC", port=node_port,
                         settle=1)
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "bonefrac", "dicom-node", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"listening" in (tmp_path / "node.log").read_bytes()
                 or node.poll() is not None, 60, "the node")
        assert node.poll() is None, (tmp_path / "node.log").read_text()
        assert orthanc.request("/modalities/bonefrac/echo", b"{}", "POST") is not None
        study = None
        for f in files:
            study = orthanc.request("/instances", f.read_bytes(), "POST")["ParentStudy"]
        orthanc.request("/modalities/bonefrac/store", study.encode(), "POST")

        def series_by_modality():
            found = {}
            for s in orthanc.get(f"/studies/{study}/series"):
                found[s["MainDicomTags"].get("Modality")] = s["Instances"]
            return found if len(found.get("OT", [])) == 2 and found.get("SR") else None

        series = wait_for(series_by_modality, 90, "the SR and SC series in Orthanc", 0.5)
        sr_bytes = orthanc.get(f"/instances/{series['SR'][0]}/file")
        (tmp_path / "sr.dcm").write_bytes(sr_bytes)
        sr = dcmread(tmp_path / "sr.dcm")
        assert sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
        want = predicted(files, tmp_path / "pred")
        assert sr_probabilities(sr) == {k: r["prob_fractured"] for k, r in want.items()}
        sc = dcmread(io.BytesIO(orthanc.get(f"/instances/{series['OT'][0]}/file")))
        assert "RESEARCH USE ONLY" in sc.ImageComments
        dump = subprocess.run([DSRDUMP, "-Ee", str(tmp_path / "sr.dcm")], capture_output=True,
                              text=True)
        assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
        assert "Imaging Measurement Report" in dump.stdout and "RESEARCH USE ONLY" in dump.stdout
    finally:
        node.terminate()
        node.wait(timeout=30)
        orthanc.stop()
