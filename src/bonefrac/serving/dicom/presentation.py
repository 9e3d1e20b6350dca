"""The Grayscale Softcopy Presentation State (GSPS) of one image, built with highdicom.

A viewer that applies presentation states (OHIF, Weasis, Orthanc's Stone viewer, dcmtk) draws
the shown boxes of :func:`.results.shown_boxes` over the original image, not over a copy:

- one closed POLYLINE per box (pixel coordinates of the source, like the SR's SCOORD, with the
  SR box group's tracking UID), each labelled ``#rank score`` by a text object above the box;
- a text line across the top of the display: the banner, P(fracture) and the decision;
- all on the graphic layer :data:`LAYER` (red; white on a grayscale display);
- the source's window: its own Window Center/Width or VOI LUT when it has one (highdicom copies
  it), else the window bonefrac displayed it with (:func:`display_window`), so the image
  looks as it did to the model; MONOCHROME1 sources get an INVERSE presentation LUT.

An image without shown boxes (decided non-fractured) still gets its GSPS, with the text line
only: one GSPS per image, in one series per study.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue

from bonefrac.data.dicom import _grayscale_values
from bonefrac.serving.dicom.results import (
    BANNER,
    MANUFACTURER,
    ModelIdentity,
    box_polyline,
    box_tracking_uid,
    copy_laterality,
    result_uid,
    shown_boxes,
    with_type2,
)

PR_SERIES_NUMBER = 9703
LAYER = "BONEFRAC"  # CS: at most 16 upper-case letters, digits, spaces, underscores
RED = hd.color.CIELabColor.from_rgb(255, 0, 0)
LABEL_HEIGHT = 0.035  # a box label's height, as a fraction of the image's height
PIXEL = hd.pr.AnnotationUnitsValues.PIXEL


def has_own_window(source: Dataset) -> bool:
    """Whether ``source`` says how to display itself: a VOI LUT, or a window of positive
    width (a broken one is ignored, as bonefrac's decoder ignores it)."""
    if "VOILUTSequence" in source:
        return True
    try:
        width = source.get("WindowWidth")
        width = width[0] if isinstance(width, MultiValue) else width
        return "WindowCenter" in source and width is not None and float(width) > 0
    except (TypeError, ValueError):
        return False


def display_window(source: Dataset) -> tuple[float, float]:
    """``(center, width)`` of the linear window (PS3.3 C.11.2.1.2.1) that maps the values
    bonefrac displays as black and white (:mod:`bonefrac.data.dicom`) to the ends of the
    output range; ``source`` must have its pixel data. Units: modality values (after any
    rescale), as a VOI window is."""
    _, lo, hi = _grayscale_values(source.pixel_array, source)
    hi = max(hi, lo + 1.0)  # a flat image: any non-empty window
    return (lo + hi) / 2 + 0.5, hi - lo + 1.0


def _label(corner: np.ndarray, text: str, source: Dataset) -> hd.pr.TextObject:
    """``text`` in a text box just above the box whose top-left ``corner`` (column, row) is
    given (inside the box at the image's top edge)."""
    cols, rows = float(source.Columns), float(source.Rows)
    height = max(8.0, LABEL_HEIGHT * rows)
    x0, y0 = float(corner[0]), float(corner[1])
    x0 = min(x0, max(0.0, cols - 0.6 * height * len(text)))
    top = y0 - height if y0 >= height else y0
    bottom = min(rows, top + height)
    right = min(cols, x0 + 0.6 * height * len(text))
    return hd.pr.TextObject(text, PIXEL, bounding_box=(x0, top, right, bottom),
                            text_justification=hd.pr.TextJustificationValues.LEFT)


def _summary(row: Mapping) -> hd.pr.TextObject:
    text = (f"{BANNER} | bonefrac P(fracture) {float(row['prob_fractured']):.3f} "
            f"{row['decision']}")
    return hd.pr.TextObject(text, hd.pr.AnnotationUnitsValues.DISPLAY,
                            bounding_box=(0.0, 0.0, 1.0, 0.04),
                            text_justification=hd.pr.TextJustificationValues.LEFT)


def build_gsps(row: Mapping, source: Dataset, model: ModelIdentity, index: int,
               box_threshold: float = 0.0) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS of image ``index`` (0-based) of a study: ``row`` is its prediction row,
    ``source`` its dataset (with pixel data when it has no window of its own)."""
    source = with_type2(source)
    layer = hd.pr.GraphicLayer(LAYER, order=1, display_color=RED,
                               description="bonefrac fracture boxes - RESEARCH USE ONLY")
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF  # white on grayscale displays
    graphics, texts = [], [_summary(row)]
    for box in shown_boxes(row, box_threshold):
        rank, poly = int(box["rank"]), box_polyline(box, source).astype(np.float64)
        graphics.append(hd.pr.GraphicObject(
            hd.pr.GraphicTypeValues.POLYLINE, poly, PIXEL,
            tracking_id=f"image {index + 1} box {rank}",
            tracking_uid=box_tracking_uid(source, rank, model)))
        texts.append(_label(poly[0], f"#{rank} {float(box['score']):.2f}", source))
    annotation = hd.pr.GraphicAnnotation([source], layer, graphic_objects=graphics or None,
                                         text_objects=texts)
    voi = None
    if not has_own_window(source):
        center, width = display_window(source)
        voi = [hd.pr.SoftcopyVOILUTTransformation(
            window_center=center, window_width=width,
            window_explanation="bonefrac display window")]
    shape = (hd.PresentationLUTShapeValues.INVERSE
             if source.PhotometricInterpretation == "MONOCHROME1"
             else hd.PresentationLUTShapeValues.IDENTITY)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=result_uid("pr-series", [source.StudyInstanceUID], model),
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=result_uid("pr", [source.SOPInstanceUID], model),
        instance_number=index + 1, manufacturer=MANUFACTURER,
        manufacturer_model_name=model.model_id[:64], software_versions=f"bonefrac {model.version}",
        device_serial_number=model.fingerprint[:64], content_label=LAYER,
        content_description="bonefrac fracture boxes - RESEARCH USE ONLY",
        graphic_annotations=[annotation], graphic_layers=[layer],
        voi_lut_transformations=voi,
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=shape),
        series_description="bonefrac boxes - RESEARCH USE ONLY")
    copy_laterality(gsps, source)
    return gsps
