"""A DICOM writer for tests and measurements: one single-image file from a pixel array, with any
attributes, so that a test states exactly what the file holds (``tests/test_dicom.py``,
``evaluations/dicom_intensity.py`` and the serving tests use it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, preamble: bool = True,
                sop_class: str = DX_STORAGE, **attrs) -> Path:
    """Write a single-image DICOM file (Explicit VR Little Endian) from ``pixels``.

    ``pixels``: ``(rows, cols)`` uint8/uint16/int16 or ``(rows, cols, 3)`` uint8 RGB, or None
    for an object without pixel data. Extra keyword arguments become DICOM attributes.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")
                                                           ).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare data set, as old archives and some exporters write them
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path
