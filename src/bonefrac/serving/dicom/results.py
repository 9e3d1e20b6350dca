"""Results as DICOM objects, built with highdicom: one Structured Report per study batch and
one Secondary Capture per image, in the source study, in two new series (the presentation
states: :mod:`.presentation`).

- **SR** (Comprehensive SR holding a TID 1500 Measurement Report): per image one TID 1501 group
  referencing it, with P(fracture) (DCM 122157 "Probability", unit "no units", the
  ``prob_fractured`` of ``bonefrac predict``) and the decision (Yes/No/Unknown) at the default
  and every named operating point; then one TID 1410 planar ROI group per shown box
  (:func:`shown_boxes`: the model's boxes at or above its box threshold, none on an image not
  decided fractured) whose region is the box as a closed POLYLINE SCOORD in the source image's
  pixel coordinates (column, row; (0, 0) is the top-left corner of the top-left pixel, so a
  fraction ``f`` of the width is ``f * Columns``), with the box's score (99BONEFRAC BF004) and
  "image N box R" (R = rank) as its tracking identifier; one TID 1501 group with the study
  result (:mod:`bonefrac.inference.study`); the model id and version as TID 4019 Algorithm
  Identification; the research-use disclaimer as TEXT under TID 1500's "Qualitative
  Evaluations" container and in the series description.
- **Secondary Capture**: the heat-map overlay of ``bonefrac predict --explain`` (map, box, peak,
  colour bar, caption) with a "RESEARCH USE ONLY - NOT FOR DIAGNOSIS" banner burned in on top.

UIDs are derived from the source instances and the model fingerprint (:func:`result_uid`), so
predicting the same images again makes the same objects: a resend after a crash replaces
rather than duplicates.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from bonefrac import DISCLAIMER
from bonefrac.inference.detections import COORDS, shown_detections

BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
MANUFACTURER = "bonefrac (research use only)"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9701, 9702
# Codes for what no standard code says; declared in the SR's Coding Scheme Identification.
SCHEME = "99BONEFRAC"
FRACTURE = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
BOX_SCORE = hd.sr.CodedConcept("BF004", SCHEME, "Fracture box score")
STUDY_RULE = hd.sr.CodedConcept("BF003", SCHEME, "Study result: maximum over images")
POINT_ID = {"default": "BF010", "triage": "BF011", "confirmation": "BF012"}


@dataclass(frozen=True)
class ModelIdentity:
    """Who made the numbers: model id, bonefrac version, fingerprint and thresholds by name
    (``{"default": t, "triage": t1, ...}``)."""

    model_id: str
    version: str
    fingerprint: str
    thresholds: Mapping[str, float]

    @classmethod
    def from_info(cls, info: Mapping) -> ModelIdentity:
        """From :func:`bonefrac.inference.predict.model_info`."""
        return cls(info["model_id"], info["version"], info["model_fingerprint"],
                   {"default": float(info["threshold"]), **info["operating_points"]})


def result_uid(kind: str, sources: Sequence[str], model: ModelIdentity) -> str:
    """A UID that depends only on ``kind``, the source SOP Instance UIDs and the model."""
    return generate_uid(entropy_srcs=[kind, model.fingerprint, *sorted(sources)])


# Patient and study attributes of Type 2 (present, possibly empty) in every image IOD, which
# highdicom copies from the source; some senders leave them out altogether.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
         "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def with_type2(source: Dataset) -> Dataset:
    """A copy of ``source`` with each missing :data:`TYPE2` attribute present and empty
    ("unknown" in DICOM), so that the results inherit exactly what the source says."""
    ds = copy.deepcopy(source)
    for key in TYPE2:
        if key not in ds:
            setattr(ds, key, "")
    return ds


def copy_laterality(obj: Dataset, source: Dataset) -> None:
    """General Series Laterality (Type 2C) of a new image or presentation series: the
    source's (series or image laterality), else present and empty (unknown)."""
    obj.Laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "")
    if obj.Laterality not in ("R", "L"):  # ImageLaterality's U (unpaired), B (both)
        obj.Laterality = ""


# ---------------------------------------------------------------------------------- the SR
def decision_concept(point: str) -> hd.sr.CodedConcept:
    """The concept name of "fracture at operating point ``point``" (a private code; the
    thresholds are parameters of the Algorithm Identification)."""
    code = POINT_ID.get(point) or "BF1" + hashlib.sha1(point.encode()).hexdigest()[:5]
    return hd.sr.CodedConcept(code, SCHEME, f"Fracture at {point} operating point"[:64])


UNKNOWN = hd.sr.CodedConcept("261665006", "SCT", "Unknown")


def _yes_no(decision: str) -> hd.sr.CodedConcept:
    """fractured -> Yes, non_fractured -> No, anything else (a gate's ``uncertain``) ->
    Unknown."""
    return {"fractured": codes.SCT.Yes, "non_fractured": codes.SCT.No}.get(decision, UNKNOWN)


def _decisions(row: Mapping, model: ModelIdentity) -> list[hd.sr.QualitativeEvaluation]:
    """The decision at the default point (``decision``: the node predicts with the model's
    default threshold) and at each named operating point (``decision_<name>``); works for an
    image row and for a study row alike."""
    return [hd.sr.QualitativeEvaluation(
        decision_concept(name), _yes_no(row["decision" if name == "default"
                                            else f"decision_{name}"]))
        for name in model.thresholds]


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    params = [f"{k} threshold {v:.6f}" for k, v in model.thresholds.items()]
    return hd.sr.AlgorithmIdentification(name=model.model_id, version=f"bonefrac {model.version}",
                                         parameters=params + [f"fingerprint {model.fingerprint}"])


def detections_of(row: Mapping) -> list[dict]:
    """The row's ``detections`` (:mod:`bonefrac.inference.detections`), best first.

    Rows of models without a detection head made before ``detections`` was a row key (the
    shipped v2) have only the heat-map box ``box_x0..box_y1`` / ``box_score``: that box is
    their one detection. The only place the node reads the ``box_*`` columns."""
    found = row.get("detections")
    if found is not None:
        return list(found)
    if "box_x0" not in row:
        return []
    return [{"rank": 1, "score": float(row["box_score"]),
             **{k: float(row[f"box_{k}"]) for k in COORDS}}]


def shown_boxes(row: Mapping, box_threshold: float) -> list[dict]:
    """The boxes the node shows and sends for ``row`` (:func:`shown_detections`)."""
    return shown_detections({**row, "detections": detections_of(row)}, box_threshold)


def box_polyline(box: Mapping, source: Dataset) -> np.ndarray:
    """A detection (fractions ``x0..y1``, clipped to the image) as a closed 5-point polyline,
    ``(5, 2)`` float32 (column, row) in the source image's pixel coordinates."""
    w, h = float(source.Columns), float(source.Rows)
    x0, y0, x1, y1 = (min(1.0, max(0.0, float(box[k]))) for k in COORDS)
    pts = [(x0 * w, y0 * h), (x1 * w, y0 * h), (x1 * w, y1 * h), (x0 * w, y1 * h),
           (x0 * w, y0 * h)]
    return np.asarray(pts, dtype=np.float32)


def box_tracking_uid(source: Dataset, rank: int, model: ModelIdentity) -> str:
    """The tracking UID of box ``rank`` of ``source``: the same in the SR and the GSPS."""
    return result_uid(f"roi-{rank}", [source.SOPInstanceUID], model)


def box_group(box: Mapping, source: Dataset, model: ModelIdentity, index: int
              ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one shown box of image ``index``: its region (SCOORD) and score."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box_polyline(box, source),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=box_tracking_uid(source, int(box["rank"]), model),
            identifier=f"image {index + 1} box {box['rank']}"),
        referenced_region=region, finding_type=FRACTURE, algorithm_id=_algorithm(model),
        measurements=[hd.sr.Measurement(name=BOX_SCORE, value=float(box["score"]),
                                        unit=codes.UCUM.NoUnits)])


def image_group(row: Mapping, source: Dataset, model: ModelIdentity, index: int
                ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: P(fracture) and the decisions, referencing the image."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("image", [source.SOPInstanceUID], model),
            identifier=f"image {index + 1}"),
        finding_type=FRACTURE, algorithm_id=_algorithm(model),
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability,
                                        value=float(row["prob_fractured"]),
                                        unit=codes.UCUM.NoUnits)],
        qualitative_evaluations=_decisions(row, model),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])


def study_group(study: Mapping, sources: Sequence[Dataset], model: ModelIdentity
                ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the study row of :func:`bonefrac.inference.study.study_rows`."""
    algo = _algorithm(model)
    evaluations = _decisions(study, model)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("study", [s.SOPInstanceUID for s in sources], model),
            identifier="study"),
        finding_type=FRACTURE, method=STUDY_RULE, algorithm_id=algo,
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability,
                                        value=float(study["prob_fractured"]),
                                        unit=codes.UCUM.NoUnits)],
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s)
                       for s in sources])


def build_sr(rows: Sequence[Mapping], sources: Sequence[Dataset], study: Mapping,
             model: ModelIdentity, box_threshold: float = 0.0) -> hd.sr.ComprehensiveSR:
    """The study's SR. ``rows[i]`` is the prediction row of ``sources[i]`` (a dataset read
    without pixel data is enough); ``study`` its study row. Per image one TID 1501 group
    (P(fracture), decisions) and one TID 1410 group per shown box (:func:`shown_boxes`);
    then the study's TID 1501 group."""
    sources = [with_type2(s) for s in sources]
    uids = [s.SOPInstanceUID for s in sources]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", [model.model_id], model), name="bonefrac",
            manufacturer_name=MANUFACTURER, model_name=model.model_id[:64]))
    groups = []
    for i, (r, s) in enumerate(zip(rows, sources, strict=True)):
        groups.append(image_group(r, s, model, i))
        groups += [box_group(b, s, model, i) for b in shown_boxes(r, box_threshold)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging"),
        imaging_measurements=[*groups, study_group(study, sources, model)])
    report[0].ContentSequence.append(_disclaimer())
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources), content=report[0],
        series_instance_uid=result_uid("sr-series", uids, model),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=result_uid("sr", uids, model),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="bonefrac AI result - RESEARCH USE ONLY")
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _disclaimer() -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: "Qualitative Evaluations" (UMLS C0034375) holding the disclaimer."""
    box = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    box.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=f"{BANNER}. {DISCLAIMER}",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    return box


def _private_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "bonefrac result concepts"
    item.CodingSchemeResponsibleOrganization = "bonefrac project (research use only)"
    return item


# ------------------------------------------------------------------- the Secondary Capture
def with_banner(figure: Image.Image, text: str = BANNER) -> np.ndarray:
    """``figure`` (RGB) with a red strip carrying ``text`` on top: ``(H + strip, W, 3)`` uint8.
    The font is sized so that the text fits the figure's width."""
    w = figure.width
    size = max(10, min(w // 28, 64))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 8 and probe.textlength(text, font=font) > w - 8:
        size -= 1
        font = _font(size)
    strip = round(size * 1.8)
    out = Image.new("RGB", (w, figure.height + strip), (170, 0, 0))
    out.paste(figure.convert("RGB"), (0, strip))
    x = max(4, (w - probe.textlength(text, font=font)) / 2)
    ImageDraw.Draw(out).text((x, (strip - size) / 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(out)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def build_sc(overlay_png: Path, source: Dataset, model: ModelIdentity, index: int
             ) -> hd.sc.SCImage:
    """The Secondary Capture of one image: its overlay PNG (``row["heatmap"]`` of
    ``predict_files(..., explain=True)``) with the banner, in the source's study."""
    with Image.open(overlay_png) as im:
        pixels = with_banner(im)
    source = with_type2(source)
    orientation = tuple(source.get("PatientOrientation") or ())
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=result_uid("sc-series", [source.StudyInstanceUID], model),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid("sc", [source.SOPInstanceUID], model),
        instance_number=index + 1, manufacturer=MANUFACTURER,
        patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
        series_description="bonefrac heat map - RESEARCH USE ONLY",
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    if len(orientation) != 2:  # Type 2: empty when unknown, rather than a made-up direction
        sc.PatientOrientation = ""
    sc.BurnedInAnnotation = "YES"
    copy_laterality(sc, source)
    ref = Dataset()  # the image this capture was derived from (PS3.3 C.7.6.1.1.4)
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = (source.SOPClassUID,
                                                               source.SOPInstanceUID)
    sc.SourceImageSequence = [ref]
    sc.ImageComments = f"{BANNER}. {DISCLAIMER}"[:10240]
    sc.DerivationDescription = (f"bonefrac {model.model_id} heat map, box and P(fracture) of "
                                f"SOP Instance {source.SOPInstanceUID}")
    return sc
