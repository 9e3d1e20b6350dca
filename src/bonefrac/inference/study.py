"""Study-level results: the per-image rows of a DICOM study aggregated into one row.

**Rule (maximum over images):** a study's ``prob_fractured`` is the largest ``prob_fractured``
of its images, and its decision at every operating point is ``fractured`` exactly when at least
one of its images is decided ``fractured`` at that point. The two statements agree because all
images share each point's threshold: max P >= t if and only if some P >= t. A fracture is
visible on some views only, so the view that shows it should decide the study; an average
would dilute it. ``max_file`` names the image that set the study's probability. A decision
other than the two classes (a gate's ``uncertain``) keeps a study without a fractured image
from being called ``non_fractured``.

A study row also says why it is ``uncertain``: ``warning`` joins its images' gate warnings,
each after its file. Patient identifiers (``accession_number``, ``patient_id``) are written
only when asked for (``predict --by-study --study-ids``), as the node logs patient names only
when configured to: they identify patients.

Used by ``bonefrac predict --by-study`` and by the DICOM node (one rule in one place).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bonefrac import CLASSES, DISCLAIMER, InputError
from bonefrac.utils import display_path, write_csv, write_json

RULE = "max over images"
STUDY_FORMAT = "bonefrac-studies/1"


# header keyword -> the study column it fills with --study-ids
ID_TAGS = {"AccessionNumber": "accession_number", "PatientID": "patient_id"}


def header_values(path: str | os.PathLike, tags: Sequence[str]) -> dict[str, str] | None:
    """``{keyword: value}`` of the DICOM header ``tags`` of a file ('' where absent), read
    without its pixels; None for a file that is not DICOM (or pydicom is not installed)."""
    try:
        import pydicom
    except ImportError:
        return None
    for force in (False, True):  # files without the preamble parse with force=True only
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=force,
                                 specific_tags=list(tags))
        except Exception:  # not DICOM (or unreadable): no study
            continue
        return {t: str(ds.get(t, "") or "").strip() for t in tags}
    return None


def study_uid(path: str | os.PathLike) -> str | None:
    """The Study Instance UID of a DICOM file, from its header only; None for a file that is
    not DICOM (or has none, or pydicom is not installed)."""
    values = header_values(path, ["StudyInstanceUID"])
    return (values or {}).get("StudyInstanceUID") or None


def study_ids(files: Iterable[str | os.PathLike]) -> dict[str, dict[str, str]]:
    """``{study UID: {"accession_number", "patient_id"}}`` from the first file of each study
    (``--study-ids``: patient identifiers, written only when asked for)."""
    out: dict[str, dict[str, str]] = {}
    for f in files:
        values = header_values(f, ["StudyInstanceUID", *ID_TAGS])
        uid = (values or {}).get("StudyInstanceUID")
        if uid and uid not in out:
            out[uid] = {col: values[tag] for tag, col in ID_TAGS.items()}
    return out


def studies_of(files: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{display_path(file): study UID}`` for the files that are DICOM with a study UID."""
    out = {}
    for f in files:
        uid = study_uid(f)
        if uid:
            out[display_path(f)] = uid
    return out


def aggregate(study: str, rows: Sequence[Mapping]) -> dict:
    """One study row from its images' prediction rows (:func:`make_row` rows), by :data:`RULE`.

    Columns: ``study_instance_uid``, ``n_images``, ``prob_fractured`` (max), ``max_file``,
    ``decision`` and every ``decision_<point>`` the rows have (``fractured`` if any image is),
    ``threshold`` (the one behind ``decision``), ``rule``, ``model_id``, ``version`` and
    ``warning``: each flagged image's gate warning after its file (``a.dcm: colour image;
    b.dcm: ...``), what makes the study ``uncertain``; '' when none.
    """
    if not rows:
        raise InputError(f"study {study}: no image rows to aggregate")
    top = max(rows, key=lambda r: r["prob_fractured"])
    out = {"study_instance_uid": study, "n_images": len(rows),
           "prob_fractured": top["prob_fractured"], "max_file": top["file"]}
    for key in (k for k in rows[0] if k == "decision" or k.startswith("decision_")):
        out[key] = _study_decision([r[key] for r in rows])
    out.update({"threshold": top.get("threshold"), "rule": RULE,
                "model_id": top.get("model_id"), "version": top.get("version"),
                "warning": "; ".join(f"{r['file']}: {r['warning']}" for r in rows
                                     if r.get("warning"))})
    return out


def _study_decision(decisions: Sequence[str]) -> str:
    """``fractured`` if any image is; else any other value an image has that is not
    ``non_fractured`` (e.g. a gate's ``uncertain``: the study is not cleared); else
    ``non_fractured``."""
    if CLASSES[1] in decisions:
        return CLASSES[1]
    return next((d for d in decisions if d != CLASSES[0]), CLASSES[0])


def study_rows(rows: Sequence[Mapping], study_of: Mapping[str, str],
               ids: Mapping[str, Mapping[str, str]] | None = None) -> list[dict]:
    """Group ``rows`` by ``study_of[row["file"]]`` and :func:`aggregate` each group, in the
    order studies first appear; rows whose file has no study are left out. ``ids``
    (:func:`study_ids`, opt-in): each study's identifiers, as columns after its UID."""
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        uid = study_of.get(r["file"])
        if uid:
            groups.setdefault(uid, []).append(r)
    out = [aggregate(uid, g) for uid, g in groups.items()]
    if ids is not None:
        blank = dict.fromkeys(ID_TAGS.values(), "")
        out = [{"study_instance_uid": r["study_instance_uid"],
                **ids.get(r["study_instance_uid"], blank), **r} for r in out]
    return out


def write_studies(out: Path, studies: Sequence[Mapping], info: Mapping) -> None:
    """``studies.csv`` and ``studies.json`` (rows + model header + rule), each atomically."""
    fields = list(studies[0]) if studies else ["study_instance_uid", "n_images",
                                               "prob_fractured", "decision"]
    write_csv(Path(out) / "studies.csv", fields, studies)
    write_json(Path(out) / "studies.json", {"format": STUDY_FORMAT, **info, "rule": RULE,
                                            "disclaimer": DISCLAIMER, "studies": list(studies)})
