"""Uploaded files -> decoded grayscale arrays, through the one decode path (``load_inputs``).

Each upload is checked before decoding: its name's suffix must be one the CLI also reads and its
first bytes must look like a supported format (content sniffing), so a renamed text file or
executable is refused as 415 without ever reaching an image decoder. It is then streamed to a
temporary file (never held whole in memory) and decoded in the isolated decode pool
(:mod:`bonefrac.data.isolation`), as the CLI decodes files: an upload that crashes, hangs or
exhausts its decoder is a 422 with that reason, and the server goes on.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from bonefrac import BonefracError
from bonefrac.data.io import DICOM_SUFFIXES, Decoded, ImageReadError
from bonefrac.data.isolation import DecodePool, decode_file
from bonefrac.inference.predict import FILE_CHECKS, PREDICT_SUFFIXES, decoded_warning

# Leading bytes of each format ``bonefrac.data.io.FORMATS`` decodes (DICOM is checked apart).
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),  # and MPO, a JPEG with extra frames
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),  # a bare J2K codestream
)
PNM = re.compile(rb"P[1-6]\s")
HEIF_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"}
FORMATS_TEXT = "JPEG, PNG, TIFF, BMP, GIF, WebP, JPEG 2000, PNM, AVIF/HEIF or DICOM"
HEAD_BYTES = 132  # the DICOM 'DICM' tag sits at bytes 128-131


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; for messages people read."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class UploadError(BonefracError):
    """An upload refused before or during decoding: an HTTP status and a plain-words reason."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


def sniff(head: bytes) -> str | None:
    """Format name from a file's first ``HEAD_BYTES`` bytes, or None if not recognised."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "HEIF"
    if PNM.match(head):
        return "PNM"
    return next((name for magic, name in MAGIC if head.startswith(magic)), None)


def upload_size(f: BinaryIO) -> int:
    """Bytes in a seekable upload (the read position is restored to the start)."""
    f.seek(0, 2)
    n = f.tell()
    f.seek(0)
    return n


def check_upload(filename: str, f: BinaryIO, max_bytes: int) -> str:
    """Validate one upload and return the suffix to decode it with.

    Raises:
        UploadError: 413 over ``max_bytes``; 415 unsupported suffix or content; 422 empty file.
    """
    suffix = Path(filename).suffix.lower()
    if suffix not in PREDICT_SUFFIXES:
        raise UploadError(415, f"unsupported file type '{suffix}' (accepted: "
                               f"{', '.join(sorted(x for x in PREDICT_SUFFIXES if x))} or none)")
    size = upload_size(f)
    if size > max_bytes:
        raise UploadError(413, f"file is {human_bytes(size)}, over the "
                               f"{human_bytes(max_bytes)} limit")
    if size == 0:
        raise UploadError(422, "empty file (0 bytes)")
    kind = sniff(f.read(HEAD_BYTES))
    f.seek(0)
    if kind is None and suffix not in DICOM_SUFFIXES:  # DICOM may lack its 128-byte preamble
        raise UploadError(415, f"content is not a supported image format: send {FORMATS_TEXT}")
    return ".dcm" if kind == "DICOM" else suffix


def decode_upload(filename: str, f: BinaryIO, sizes: Iterable[int], max_bytes: int, *,
                  resize: str, display: bool = False,
                  pool: DecodePool | None = None) -> tuple[Decoded, str]:
    """One upload -> (its :class:`~bonefrac.data.io.Decoded`: ``{size: (size, size) uint8}``
    for every model input size and, with ``display``, the image at its own size; warning).

    The bytes are streamed (1 MiB at a time) to a temporary file with the checked suffix and
    decoded in ``pool`` (default: the process's decode pool) exactly as the CLI decodes a
    file; the warning is the CLI's (:func:`~bonefrac.inference.predict.decoded_warning`).

    Raises:
        UploadError: as ``check_upload``, or 422 with the decoder's reason (including "decoder
            crashed (SIGSEGV)", "decode timed out after 10 s", "decoder exceeded 2 GiB ...").
    """
    suffix = check_upload(filename, f, max_bytes)
    sizes = sorted(sizes)
    with tempfile.NamedTemporaryFile(prefix="bonefrac_upload_", suffix=suffix) as tmp:
        shutil.copyfileobj(f, tmp, 1 << 20)
        tmp.flush()
        try:
            d = decode_file(tmp.name, sizes, display=display, resize=resize,
                            checks=FILE_CHECKS, pool=pool)
        except ImageReadError as e:
            raise UploadError(422, e.reason) from None
    return d, decoded_warning(d, sizes[-1])
