"""The node's result objects on their own: every shown box in the SR and the GSPS (rows in the
``detections`` form of a detector and in the v2 box form), the GSPS's window against what
bonefrac displayed, dciodvfy / dcmpschk on each object, and STOW-RS credentials against a real
Orthanc (wrong ones refused and kept for a retry, a rotated file used at the next attempt)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from helpers import real_images

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from PIL import Image  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from test_dicom_node import (  # noqa: E402
    Orthanc,
    instances_of,
    need_orthanc,
    need_validators,
    sr_content,
    to_dicom,
    validation_errors,
)

from bonefrac.data.dicom import display_array  # noqa: E402
from bonefrac.serving.dicom.config import parse_config  # noqa: E402
from bonefrac.serving.dicom.presentation import build_gsps  # noqa: E402
from bonefrac.serving.dicom.results import (  # noqa: E402
    ModelIdentity,
    build_sc,
    build_sr,
    shown_boxes,
)
from bonefrac.serving.dicom.sender import Sender  # noqa: E402

MODEL = ModelIdentity("bonefrac-test-model", "0.0", "f" * 16,
                      {"default": 0.5, "triage": 0.2})
THRESHOLD = 0.25


def _row(prob: float, decision: str, **extra) -> dict:
    return {"prob_fractured": prob, "decision": decision, "decision_triage": decision, **extra}


# A detector's row (3 boxes: one under the threshold, one past the right edge), one decided
# non-fractured (boxes never shown), and a v2 row (the heat-map box only).
ROWS = [_row(0.91, "fractured", detections=[
            {"rank": 1, "score": 0.82, "x0": 0.10, "y0": 0.0, "x1": 0.40, "y1": 0.50},
            {"rank": 2, "score": 0.40, "x0": 0.55, "y0": 0.60, "x1": 1.01, "y1": 0.95},
            {"rank": 3, "score": 0.10, "x0": 0.20, "y0": 0.20, "x1": 0.30, "y1": 0.30}]),
        _row(0.08, "non_fractured", detections=[
            {"rank": 1, "score": 0.60, "x0": 0.1, "y0": 0.1, "x1": 0.2, "y1": 0.2}]),
        _row(0.70, "fractured", box_x0=0.3, box_y0=0.4, box_x1=0.6, box_y1=0.7,
             box_score=0.66)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    study, series = generate_uid(), generate_uid()
    return [dcmread(to_dicom(j, folder / f"{i}.dcm", study, series, i + 1))
            for i, j in enumerate(real_images(len(ROWS)))]


def test_every_shown_box_in_the_sr_and_the_gsps(sources, tmp_path):
    assert [len(shown_boxes(r, THRESHOLD)) for r in ROWS] == [2, 0, 1]
    study = {**ROWS[0], "file": "x"}
    sr = build_sr(ROWS, sources, study, MODEL, THRESHOLD)
    probs, boxes, study_p = sr_content(sr)
    uids = [s.SOPInstanceUID for s in sources]
    assert probs == {u: r["prob_fractured"] for u, r in zip(uids, ROWS, strict=True)}
    assert study_p == 0.91
    assert [s for s, _ in boxes[uids[0]]] == [0.82, 0.40] and uids[1] not in boxes
    assert [s for s, _ in boxes[uids[2]]] == [0.66]
    assert boxes[uids[0]][1][1][:, 0].max() == sources[0].Columns  # x1 1.01: clipped
    w, h = sources[2].Columns, sources[2].Rows
    assert np.allclose(boxes[uids[2]][0][1][[0, 2]], [[0.3 * w, 0.4 * h], [0.6 * w, 0.7 * h]])
    sr_tracking = {i.UID for i in _items(sr, "Tracking Unique Identifier")}
    for i, (row, source) in enumerate(zip(ROWS, sources, strict=True)):
        pr = build_gsps(row, source, MODEL, i, THRESHOLD)
        ann = pr.GraphicAnnotationSequence[0]
        graphics = ann.get("GraphicObjectSequence", [])
        assert len(graphics) == len(boxes.get(source.SOPInstanceUID, []))
        for g, (_, poly) in zip(graphics, boxes.get(source.SOPInstanceUID, []), strict=True):
            assert np.allclose(np.reshape(g.GraphicData, (-1, 2)), poly)
            assert g.TrackingUID in sr_tracking  # the same box in both objects
        labels = [t.UnformattedTextValue for t in ann.TextObjectSequence]
        assert labels[0].startswith("RESEARCH USE ONLY") and row["decision"] in labels[0]
        assert labels[1:] == [f"#{b['rank']} {b['score']:.2f}"
                              for b in shown_boxes(row, THRESHOLD)]
        assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
            .ReferencedSOPInstanceUID == source.SOPInstanceUID


def _items(ds, meaning: str) -> list:
    """Every content item of an SR, at any depth, whose concept name is ``meaning``."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            out.append(item)
        out += _items(item, meaning)
    return out


def test_validators_accept_sr_sc_and_gsps(sources, tmp_path):
    need_validators()
    overlay = tmp_path / "overlay.png"
    Image.open(real_images(1)[0]).convert("RGB").save(overlay)
    objects = [build_sr(ROWS, sources, ROWS[0], MODEL, THRESHOLD),
               build_sc(overlay, sources[0], MODEL, 0)]
    objects += [build_gsps(r, s, MODEL, i, THRESHOLD)
                for i, (r, s) in enumerate(zip(ROWS, sources, strict=True))]
    for ds in objects:
        assert validation_errors(ds, tmp_path / "v") == [], ds.SOPClassUID.name


@pytest.mark.parametrize("photometric,window", [("MONOCHROME2", None),
                                                ("MONOCHROME1", None),
                                                ("MONOCHROME2", (1800.0, 2500.0))])
def test_gsps_window_shows_what_bonefrac_showed(sources, tmp_path, photometric, window):
    """12-bit data: the GSPS's window (the source's own, else the one worked out) and
    presentation LUT give the grey levels bonefrac's decoder gave the model, within 1 of 255."""
    need_validators()
    ds = copy.deepcopy(sources[0])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = (sources[0].pixel_array.astype(np.uint16) * 16 + 7).tobytes()
    ds.PhotometricInterpretation = photometric
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    pr = build_gsps(ROWS[0], ds, MODEL, 0, THRESHOLD)
    voi = pr.SoftcopyVOILUTSequence[0]
    c, w = float(voi.WindowCenter), float(voi.WindowWidth)
    if window:
        assert (c, w) == window
    # PS3.3 C.11.2.1.2.1 (linear window), then the presentation LUT (INVERSE: white is low)
    x = ds.pixel_array.astype(np.float64)
    shown = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5), 0, 1) * 255
    if pr.PresentationLUTShape == "INVERSE":
        shown = 255 - shown
    assert pr.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1"
                                       else "IDENTITY")
    assert np.abs(shown - display_array(ds.pixel_array, ds)).max() <= 1.0
    assert validation_errors(pr, tmp_path) == []


@pytest.mark.slow
def test_stow_rs_credentials_refused_kept_and_rotated(sources, tmp_path):
    """A wrong bearer token and a wrong password: the server refuses (HTTP 401/403), the
    files stay in the outbox with the error; the right credential written into the same file
    is used at the next attempt and the server has the object."""
    need_orthanc()
    bearer = Orthanc(tmp_path / "bearer", dicomweb=True, bearer="right-token")
    basic = Orthanc(tmp_path / "basic", dicomweb=True, user=("node", "right"))
    try:
        (tmp_path / "token").write_text("wrong-token")
        (tmp_path / "pair").write_text("node:wrong")
        cfg = parse_config({
            "spool": "spool", "allowed_callers": {"PACS": ["127.0.0.1"]},
            "send": {"retries": 3, "retry_seconds": 0.0},
            "destinations": [{"url": bearer.dicomweb, "token_file": "token"},
                             {"url": basic.dicomweb, "basic_auth_file": "pair"}]}, tmp_path)
        sender = Sender(cfg, tmp_path / "spool", "BONEFRAC")
        pr = build_gsps(ROWS[0], sources[0], MODEL, 0, THRESHOLD)
        sender.put(sources[0].StudyInstanceUID, [pr])
        sender.send_due()
        assert sender.pending() == 2 and sender.delivered == 0
        outbox = tmp_path / "spool" / "outbox"
        errors = [json.loads(next((outbox / d.name).glob("*/.attempts.json")).read_text())
                  ["last_error"] for d in cfg.destinations]
        assert "HTTP 403" in errors[0] and "HTTP 401" in errors[1], errors
        (tmp_path / "token").write_text("right-token\n")
        (tmp_path / "pair").write_text("node:right")
        sender.send_due(now=1e12)  # past any retry delay
        assert sender.pending() == 0 and sender.delivered == 2
        for server in (bearer, basic):
            assert set(instances_of(server.qido(pr.StudyInstanceUID))) == {pr.SOPInstanceUID}
    finally:
        bearer.stop()
        basic.stop()
