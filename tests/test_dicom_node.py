"""The DICOM node against real peers: real Orthancs (Debian's package with its DICOMweb plugin,
started here with their own config, ports and storage) and pynetdicom peers on loopback, with
real radiographs from tests/data converted to DX DICOM; every result object checked by
dicom3tools' dciodvfy (and the GSPS by dcmtk's dcmpschk).

Needs ``scripts/ci/install_orthanc.sh`` (orthanc, orthanc-dicomweb, dcmtk, dicom3tools); without
it the tests that need them are skipped, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import signal
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
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from bonefrac.cli.main import main  # noqa: E402
from bonefrac.inference.ensemble import Ensemble  # noqa: E402
from bonefrac.inference.model_folder import resolve_model  # noqa: E402
from bonefrac.inference.study import RULE, aggregate, study_rows  # noqa: E402
from bonefrac.serving.dicom.config import ConfigError, load_config, parse_config  # noqa: E402
from bonefrac.serving.dicom.node import DicomNode  # noqa: E402
from bonefrac.serving.dicom.results import shown_boxes  # noqa: E402

DX = DigitalXRayImageStorageForPresentation
SR, SC = ComprehensiveSRStorage, SecondaryCaptureImageStorage
PR = GrayscaleSoftcopyPresentationStateStorage
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TOOLS = {n: shutil.which(n) for n in ("dsrdump", "dciodvfy", "dcmpschk")}
DSRDUMP = TOOLS["dsrdump"]


def need(what: dict[str, bool]) -> None:
    """Skip (fail under CI) unless every tool in ``what`` is there."""
    missing = ", ".join(n for n, ok in what.items() if not ok)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} not installed: scripts/ci/install_orthanc.sh must run first")
        pytest.skip(f"{missing} not installed (run scripts/ci/install_orthanc.sh)")


def need_validators() -> None:
    need({"dicom3tools": TOOLS["dciodvfy"], "dcmtk": TOOLS["dcmpschk"]})


def validation_errors(ds: Dataset, folder: Path) -> list[str]:
    """dciodvfy's "Error" lines for ``ds`` (written to ``folder``), and dcmpschk's errors
    when it is a GSPS; [] when both accept it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run([TOOLS["dciodvfy"], str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines()
              if line.startswith("Error")]
    if ds.SOPClassUID == PR:
        ps = subprocess.run([TOOLS["dcmpschk"], str(path)], capture_output=True, text=True)
        text = ps.stdout + ps.stderr
        if ps.returncode != 0 or "Test passed" not in text:
            errors.append(f"dcmpschk: {text.strip()[-500:]}")
    return errors


def warnings_of(ds: Dataset, folder: Path) -> set[str]:
    """dciodvfy's distinct "Warning" lines for ``ds`` (for the documentation)."""
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = subprocess.run([TOOLS["dciodvfy"], str(path)], capture_output=True, text=True)
    return {line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Warning")}


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
        for uid in (SR, SC, PR, Verification):
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


def _name(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def sr_content(sr: Dataset) -> tuple[dict[str, float], dict[str, list], float]:
    """From an SR: {source SOP Instance UID: P(fracture)} of the per-image groups, {source
    UID: [(score, (5, 2) polyline)] of its box groups, in order}, and the study P."""
    probs, boxes, study = {}, {}, None
    for container in sr.ContentSequence:
        if _name(container) != "Imaging Measurements":
            continue
        for group in container.ContentSequence:
            items = group.ContentSequence
            nums = {_name(i): float(i.MeasuredValueSequence[0].NumericValue) for i in items
                    if i.ValueType == "NUM"}
            regions = [i for i in items if i.ValueType == "SCOORD"]
            images = [i for i in items if i.ValueType == "IMAGE"]
            if regions:
                ref = regions[0].ContentSequence[0].ReferencedSOPSequence[0]
                boxes.setdefault(ref.ReferencedSOPInstanceUID, []).append(
                    (nums["Fracture box score"],
                     np.asarray(regions[0].GraphicData).reshape(-1, 2)))
            elif len(images) == 1:
                uid = images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                probs[uid] = nums["Probability"]
            else:
                study = nums["Probability"]
    return probs, boxes, study


def sr_probabilities(sr: Dataset) -> dict[str, float]:
    """{referenced source SOP Instance UID: P(fracture)} from the per-image groups of an SR."""
    return sr_content(sr)[0]


def check_results(received: list[Dataset], files: list[Path], rows: dict[str, dict],
                  box_threshold: float, folder: Path) -> None:
    """The results of one study as the node sends them: one SR, SC and GSPS per image, in
    the source study; the SR's probabilities those of ``rows`` (``bonefrac predict``), its
    boxes the shown ones, which each image's GSPS draws; dciodvfy/dcmpschk accept them all."""
    by_class = {c: [d for d in received if d.SOPClassUID == c] for c in (SR, SC, PR)}
    assert [len(by_class[c]) for c in (SR, SC, PR)] == [1, len(files), len(files)]
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    probs, boxes, _ = sr_content(by_class[SR][0])
    assert probs == {k: r["prob_fractured"] for k, r in rows.items()}
    for pr in by_class[PR]:
        assert pr.StudyInstanceUID == study_uid and "RESEARCH USE ONLY" in pr.SeriesDescription
        source = pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        uid = source.ReferencedSOPInstanceUID
        shown = shown_boxes(rows[uid], box_threshold)
        drawn = [np.asarray(g.GraphicData).reshape(-1, 2)
                 for a in pr.GraphicAnnotationSequence for g in a.get("GraphicObjectSequence", [])]
        texts = [t.UnformattedTextValue for a in pr.GraphicAnnotationSequence
                 for t in a.TextObjectSequence]
        assert [s for s, _ in boxes.get(uid, [])] == [b["score"] for b in shown]
        assert len(drawn) == len(shown) and all(
            np.allclose(d, g) for d, (_, g) in zip(drawn, boxes.get(uid, []), strict=True))
        assert texts[0].startswith("RESEARCH USE ONLY") and texts[1:] == [
            f"#{b['rank']} {b['score']:.2f}" for b in shown]
        assert pr.GraphicLayerSequence[0].GraphicLayer == "BONEFRAC"
    for ds in received:
        assert validation_errors(ds, folder) == [], ds.SOPClassUID.name


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


def test_config_destinations_stowrs_and_results(tmp_path):
    (tmp_path / "token").write_text("abc\n")
    (tmp_path / "pair").write_text("user:pw")
    base = {"spool": "s", "allowed_callers": {"PACS": ["10.0.0.5"]}}

    def dest(**d):
        return parse_config({**base, "destinations": [d]}, tmp_path).destinations[0]

    d = dest(url="https://pacs:8443/dicom-web/", token_file="token", results=["sr", "gsps"])
    assert (d.url, d.token_file, d.results) == ("https://pacs:8443/dicom-web",
                                                tmp_path / "token", ("sr", "gsps"))
    assert d.name.startswith("stowrs@pacs_8443_") and "/" not in d.name
    plain = dest(ae_title="PACS", host="10.0.0.5", port=104)
    assert plain.results == ("sr", "sc", "gsps") and plain.name == "PACS@10.0.0.5_104"
    for bad, word in [({"url": "ftp://x"}, "not an http"),
                      ({"url": "http://x", "port": 1}, "do not apply"),
                      ({"url": "http://x", "token_file": "none"}, "token_file: .*cannot read"),
                      ({"url": "http://x", "basic_auth_file": "token"}, "user:password"),
                      ({"url": "http://x", "token_file": "token", "basic_auth_file": "pair"},
                       "not both"),
                      ({"ae_title": "P", "host": "h", "port": 1, "token_file": "token"},
                       "need a STOW-RS"),
                      ({"url": "http://x", "results": ["sr", "pdf"]}, "results"),
                      ({"url": "http://x", "results": []}, "results"),
                      ({"host": "h"}, "lacks ae_title, port")]:
        with pytest.raises(ConfigError, match=word):
            dest(**bad)


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
    need_validators()
    wait_for(lambda: len(receiver.of_class(SC)) == 2 and len(receiver.of_class(PR)) == 2
             and receiver.of_class(SR), 60, "the results")
    want = predicted(files, tmp_path / "pred")
    check_results(receiver.received, files, want, getattr(node.ens, "box_threshold", 0.0),
                  tmp_path / "check")
    study_uid = dcmread(files[0]).StudyInstanceUID
    for ds in receiver.received:
        assert ds.StudyInstanceUID == study_uid and "RESEARCH USE ONLY" in ds.SeriesDescription
    sc = receiver.of_class(SC)[0]
    assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape[2] == 3
    done = json.loads((tmp_path / "spool" / "done" / f"{study_uid}.json").read_text())
    assert len(done["sop_instance_uids"]) == 2 and len(done["batches"]) == 1
    log = (tmp_path / "spool" / "log" / "predictions.csv").read_text()
    assert log.count("\n") == 3 and "Test^Bone" not in log  # no names unless configured
    boxes = (tmp_path / "spool" / "log" / "detections.csv").read_text().splitlines()
    assert boxes[0].startswith("file,sop_instance_uid,rank,score,x0")
    assert len(boxes) == 1 + sum(len(r.get("detections") or [1]) for r in want.values())
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
    wait_for(lambda: receiver.of_class(SR), 60, "the good image's SR")


def test_results_by_kind_and_no_gsps_for_a_colour_image(make_node, receiver, tmp_path):
    """The node builds only what a destination wants, and no GSPS for an RGB image (a
    grayscale presentation state cannot reference it)."""
    files = make_study(tmp_path / "in", 2)
    rgb = dcmread(files[1])
    pixels = np.repeat(rgb.pixel_array[..., None], 3, axis=2)
    rgb.SOPClassUID = rgb.file_meta.MediaStorageSOPClassUID = SC
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.PixelData = pixels.tobytes()
    rgb.save_as(files[1], enforce_file_format=True)
    tail = ("[[destinations]]\nae_title = \"OTHER\"\nhost = \"127.0.0.1\"\n"
            f"port = {receiver.port}\nresults = [\"gsps\"]\n")
    node = make_node(node_config(tmp_path, receiver.port, settle=3600, tail=tail))
    want = predicted(files, tmp_path / "pred")
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    rows = [want[s.SOPInstanceUID] for s in sources]  # no "heatmap": no SC
    objects = node.results(rows, files, sources, aggregate("1.2", rows))
    assert [str(o.SOPClassUID) for o in objects] == [SR, PR]
    assert objects[1].ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
        .ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    # only SCs wanted (and none made: the rows have no overlay): no SR, no GSPS built
    node.config = dataclasses.replace(node.config, destinations=tuple(
        dataclasses.replace(d, results=("sc",)) for d in node.config.destinations))
    assert node.results(rows, files, sources, aggregate("1.2", rows)) == []


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
        assert len(list(dead.glob("*/*/*.dcm"))) == 3  # SR, capture, GSPS: kept
        assert second.spool.pending() == 0
    finally:
        second.stop()


# --------------------------------------------------------------------- the real PACS
class NodeProcess:
    """``python -m bonefrac dicom-node --config CONFIG`` in a subprocess, logging to ``log``;
    returns once it listens."""

    def __init__(self, config: Path, log: Path):
        self.log = log
        with open(log, "wb") as f:  # the child keeps its own handle
            self.proc = subprocess.Popen([sys.executable, "-m", "bonefrac", "dicom-node",
                                          "--config", str(config)], stdout=f,
                                         stderr=subprocess.STDOUT)
        wait_for(lambda: b"listening" in log.read_bytes() or self.proc.poll() is not None,
                 120, "the node")
        assert self.proc.poll() is None, log.read_text()

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_after_acknowledging_a_study_results_arrive_once_each(receiver, tmp_path):
    """A pynetdicom SCP as the destination gets the SR, each SC and each GSPS exactly once
    although the node was SIGKILLed right after acknowledging the study and restarted."""
    files = make_study(tmp_path / "in", 2)
    port = free_port()
    config = node_config(tmp_path, receiver.port, port=port, settle=2)
    node = NodeProcess(config, tmp_path / "node-1.log")
    assert send(port, files) == [0, 0]
    node.kill()  # acknowledged; settle_seconds not over, so nothing processed or sent
    assert len(list((tmp_path / "spool" / "incoming").glob("*/*/*.dcm"))) == 2
    assert receiver.received == []
    node = NodeProcess(config, tmp_path / "node-2.log")
    try:
        wait_for(lambda: len(receiver.received) >= 5, 120, "the results")
        wait_for(lambda: not any((tmp_path / "spool" / "outbox").glob("*/*/*.dcm")), 30,
                 "an empty outbox")
        time.sleep(1.0)  # two sender polls: a resend would have arrived by now
        uids = [str(d.SOPInstanceUID) for d in receiver.received]
        assert len(uids) == len(set(uids)) == 5
        assert sorted(str(d.SOPClassUID) for d in receiver.received) == sorted(
            [SR, SC, SC, PR, PR])
    finally:
        node.stop()


BEARER_FILTER = """function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return httpHeaders['authorization'] == 'Bearer %s'
end
"""


class Orthanc:
    """A private Orthanc: own config, storage folder and free ports on loopback. ``node_port``:
    the node as its DICOM modality "bonefrac"; ``dicomweb``: with the DICOMweb plugin;
    ``user``: (name, password) of basic auth; ``bearer``: a token every HTTP request must
    carry (checked by a Lua filter)."""

    def __init__(self, folder: Path, node_port: int | None = None, aet: str = "ORTHANC",
                 dicomweb: bool = False, user: tuple[str, str] | None = None,
                 bearer: str | None = None):
        self.http, self.dicom, self.aet = free_port(), free_port(), aet
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bonefrac-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": user is not None, "Plugins": [],
            "DicomCheckCalledAet": False, "DicomScuTimeout": 30, "HttpTimeout": 60,
            "DicomModalities": ({"bonefrac": ["BONEFRAC", "127.0.0.1", node_port]}
                                if node_port else {})}
        self.headers = {}
        if dicomweb:
            config.update(Plugins=[str(DICOMWEB)],
                          DicomWeb={"Enable": True, "Root": "/dicom-web/"})
        if user:
            config["RegisteredUsers"] = {user[0]: user[1]}
            pair = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {pair}"
        if bearer:
            (folder / "bearer.lua").write_text(BEARER_FILTER % bearer)
            config["LuaScripts"] = [str(folder / "bearer.lua")]
            self.headers["Authorization"] = f"Bearer {bearer}"
        (folder / "orthanc.json").write_text(json.dumps(config))
        with open(folder / "orthanc.log", "wb") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._alive(), 30, "Orthanc's REST API")

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http}/dicom-web"

    def _alive(self) -> bool:
        assert self.proc.poll() is None, "Orthanc exited; see orthanc.log"
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def request(self, path: str, data: bytes | None = None, method: str | None = None,
                accept: str | None = None, raw: bool = False):
        """The reply's body: parsed JSON when it is JSON (unless ``raw``), else bytes."""
        headers = {**self.headers, **({"Accept": accept} if accept else {})}
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data,
                                     method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            body, self.content_type = r.read(), r.headers.get("Content-Type", "")
        return json.loads(body) if body[:1] in (b"{", b"[") and not raw else body

    def get(self, path: str):
        return self.request(path)

    def qido(self, study: str) -> list[dict]:
        """QIDO-RS: the study's instances as DICOM JSON (tags as keys)."""
        return self.request(f"/dicom-web/studies/{study}/instances",
                            accept="application/dicom+json")

    def wado(self, study: str, series: str, sop: str) -> Dataset:
        """WADO-RS: one instance, from its multipart/related reply."""
        body = self.request(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                            accept='multipart/related; type="application/dicom"', raw=True)
        boundary = self.content_type.split("boundary=")[1].split(";")[0].strip('"')
        parts = [p for p in body.split(b"--" + boundary.encode())[1:-1]]
        assert len(parts) == 1, f"{len(parts)} parts for one instance"
        return dcmread(io.BytesIO(parts[0].split(b"\r\n\r\n", 1)[1][:-2]))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def need_orthanc() -> None:
    need({"orthanc": ORTHANC.exists(), "orthanc-dicomweb": DICOMWEB.exists(),
          "dcmtk": DSRDUMP and TOOLS["dcmpschk"], "dicom3tools": TOOLS["dciodvfy"]})


def instances_of(qido: list[dict]) -> dict[str, tuple[str, str]]:
    """{SOP Instance UID: (SOP Class UID, Series Instance UID)} from a QIDO-RS reply."""
    return {i["00080018"]["Value"][0]: (i["00080016"]["Value"][0], i["0020000E"]["Value"][0])
            for i in qido}


@pytest.mark.slow
def test_orthanc_round_trip_and_stow_rs(tmp_path):
    """Upload to Orthanc over REST, Orthanc C-STOREs the study to `bonefrac dicom-node`; the
    SR, captures and presentation states arrive back in Orthanc in the same study (the SR's
    probabilities those of `bonefrac predict`, dciodvfy/dcmpschk accept every object, dcmtk's
    dsrdump reads the SR); the same objects reach a second Orthanc by STOW-RS with basic auth,
    and a third with a bearer token (there ``results = ["sr", "gsps"]``), read back through
    QIDO-RS and WADO-RS."""
    need_orthanc()
    files = make_study(tmp_path / "in", 2)
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    basic = Orthanc(tmp_path / "stow-basic", dicomweb=True, user=("bonefrac", "s3cret:x"))
    bearer = Orthanc(tmp_path / "stow-bearer", dicomweb=True, bearer="t0ken-123")
    (tmp_path / "basic.txt").write_text("bonefrac:s3cret:x\n")
    (tmp_path / "token.txt").write_text("t0ken-123\n")
    tail = (f'[[destinations]]\nurl = "{basic.dicomweb}"\nbasic_auth_file = "basic.txt"\n'
            f'[[destinations]]\nurl = "{bearer.dicomweb}/"\ntoken_file = "token.txt"\n'
            'results = ["gsps", "sr"]\n')
    config = node_config(tmp_path, pacs.dicom, dest_aet="ORTHANC", port=node_port, settle=1,
                         tail=tail)
    node = NodeProcess(config, tmp_path / "node.log")
    try:
        assert pacs.request("/modalities/bonefrac/echo", b"{}", "POST") is not None
        study = None
        for f in files:
            study = pacs.request("/instances", f.read_bytes(), "POST")["ParentStudy"]
        pacs.request("/modalities/bonefrac/store", study.encode(), "POST")

        def series_by_modality():
            found = {}
            for s in pacs.get(f"/studies/{study}/series"):
                found[s["MainDicomTags"].get("Modality")] = s["Instances"]
            done = [len(found.get(m, [])) for m in ("OT", "PR", "SR")] == [2, 2, 1]
            return found if done else None

        series = wait_for(series_by_modality, 120, "the SR, SC and PR series in Orthanc", 0.5)
        results = {}
        for m in ("SR", "OT", "PR"):
            for i in series[m]:
                ds = dcmread(io.BytesIO(pacs.get(f"/instances/{i}/file")))
                results[str(ds.SOPInstanceUID)] = ds
        assert all(d.StudyInstanceUID == study_uid for d in results.values())
        want = predicted(files, tmp_path / "pred")
        check_results(list(results.values()), files, want,
                      Ensemble.load(resolve_model(None)).box_threshold, tmp_path / "check")
        sr = next(d for d in results.values() if d.SOPClassUID == SR)
        sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        dump = subprocess.run([DSRDUMP, "-Ee", str(tmp_path / "sr.dcm")], capture_output=True,
                              text=True)
        assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
        assert "Imaging Measurement Report" in dump.stdout and "RESEARCH USE ONLY" in dump.stdout
        # STOW-RS destinations: the same objects (only SR + GSPS where configured so)
        wanted = {u for u, d in results.items() if d.SOPClassUID in (SR, PR)}
        for server, uids in ((basic, set(results)), (bearer, wanted)):
            found = wait_for(lambda s=server, u=uids: (lambda f: f if set(f) == u else None)(
                instances_of(s.qido(study_uid))), 60, "the STOW-RS results", 0.5)
            for uid, (_, series_uid) in found.items():
                assert server.wado(study_uid, series_uid, uid) == results[uid]
    finally:
        node.stop()
        for server in (pacs, basic, bearer):
            server.stop()
    log = (tmp_path / "node.log").read_text()
    assert "Traceback" not in log and " ERROR " not in log and "(attempt" not in log, log
