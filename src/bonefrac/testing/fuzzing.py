"""A seeded mutation fuzzer for the decoders, and the hostile files it is measured against.

Used by ``tests/test_fuzz.py`` (1,000 mutants) and ``evaluations/fuzz_inputs.py`` (20,000).
The seed radiographs are read from a folder that holds :data:`RADIOGRAPHS` (the repository's
``tests/data``), passed as ``data``.

- :func:`write_seeds`: the clean originals: real radiographs from the data set (``tests/data``)
  as JPEG (baseline and progressive), PNG, 16-bit PNG, TIFF (raw, LZW, deflate), WebP (lossy,
  lossless), JPEG 2000 and DICOM (the radiograph uncompressed, and as RLE, JPEG baseline,
  JPEG extended (8-bit), JPEG 2000 and JPEG-LS), plus pydicom's bundled test objects, one or
  more per transfer syntax they carry (:data:`PYDICOM_SEEDS`: explicit/implicit little
  endian, big endian, deflate, RLE, JPEG baseline and lossless, JPEG-LS lossless and
  near-lossless, JPEG 2000 lossless and lossy). Left out: pydicom's JPEG Extended objects are
  12-bit, which only the GPL pylibjpeg-libjpeg decodes (bonefrac refuses them with that
  reason), and it ships no HTJ2K object. Every original decodes.
- :func:`write_mutants`: ``n`` mutants of those seeds; mutant ``i`` depends only on ``(seed, i)``
  (``random.Random(f"{seed}:{i}")``): 1 to 3 of bit flips, byte runs, "interesting" integers
  (0, 0xFFFF, 2**31 - 1, ... where headers keep sizes and offsets), truncations, spliced
  headers (another seed's head on this body, or the reverse), duplicated and deleted chunks.
  Offsets favour the first 2 KiB, where parsers read lengths and dimensions.
- :func:`write_bombs`: decompression bombs and absurd headers for every format.
- :func:`write_tiny_files`: a folder of zero- and one-byte files.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# Two real radiographs (one fractured, one not), relative to the ``data`` folder.
RADIOGRAPHS = ("fractured/image1_0_png.rf.d29cab92b154a83ca5bf7e40083673a2.jpg",
               "non_fractured/image1_1006_png.rf.b66f118e03810b7d9eb89951f328d910.jpg")
SEED_SIDE = 320  # the seeds are radiographs scaled to this longest side: quick to decode
# pydicom's bundled test files used as seeds: (file, transfer syntax), single-frame images.
PYDICOM_SEEDS = (
    ("MR_small.dcm", "Explicit VR Little Endian"),
    ("CT_small.dcm", "Explicit VR Little Endian"),
    ("MR_small_implicit.dcm", "Implicit VR Little Endian"),
    ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
    ("image_dfl.dcm", "Deflated Explicit VR Little Endian"),
    ("MR_small_RLE.dcm", "RLE Lossless"),
    ("SC_rgb_rle_16bit.dcm", "RLE Lossless"),
    ("SC_rgb_rle_32bit.dcm", "RLE Lossless"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline (Process 1)"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression"),
    ("SC_rgb_jls_lossy_line.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
    ("JPEG2000.dcm", "JPEG 2000 Image Compression"),
)
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF)
HEAD = 2048


# ------------------------------------------------------------------------------------ seeds
def _radiograph(data: Path, rel: str) -> Image.Image:
    im = Image.open(data / rel).convert("L")
    im.thumbnail((SEED_SIDE, SEED_SIDE))
    return im


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_seeds(im: Image.Image) -> dict[str, bytes]:
    """One radiograph in each raster format: ``{name with suffix: bytes}``."""
    wide = Image.fromarray(np.asarray(im, dtype=np.uint16) * 257)  # 16-bit, full range
    return {
        "baseline.jpg": _encoded(im, "JPEG", quality=90),
        "progressive.jpg": _encoded(im, "JPEG", quality=85, progressive=True),
        "gray8.png": _encoded(im, "PNG"),
        "gray16.png": _encoded(wide, "PNG"),
        "raw.tif": _encoded(im, "TIFF"),
        "lzw.tif": _encoded(im, "TIFF", compression="tiff_lzw"),
        "deflate16.tif": _encoded(wide, "TIFF", compression="tiff_adobe_deflate"),
        "lossy.webp": _encoded(im.convert("RGB"), "WEBP", quality=80),
        "lossless.webp": _encoded(im.convert("RGB"), "WEBP", lossless=True),
        "j2k.jp2": _encoded(im, "JPEG2000", irreversible=False),
    }


def _dicom_seeds(im: Image.Image) -> dict[str, bytes]:
    """The radiograph as DICOM: uncompressed and in every syntax pydicom can encode here."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLSLossless,
        RLELossless,
    )

    out = {"radiograph_explicit.dcm": _dicom_bytes(np.asarray(im))}
    jpeg = _encoded(im, "JPEG", quality=90)  # 8-bit: valid in JPEG baseline and extended
    for name, syntax in (("jpeg_baseline", JPEGBaseline8Bit),
                         ("jpeg_extended", JPEGExtended12Bit)):
        out[f"radiograph_{name}.dcm"] = _dicom_bytes(np.asarray(im), encapsulated=(
            syntax, encapsulate([jpeg])))
    for name, syntax in (("rle", RLELossless), ("j2k", JPEG2000Lossless),
                         ("jpegls", JPEGLSLossless)):
        with contextlib.suppress(RuntimeError, ValueError, ImportError):  # no encoder here
            out[f"radiograph_{name}.dcm"] = _dicom_bytes(np.asarray(im), syntax)
    return out


def _dicom_bytes(pixels: np.ndarray, syntax=None, encapsulated=None, **attrs) -> bytes:
    """A DX secondary capture holding ``pixels`` (uint8 or uint16), compressed to ``syntax``
    by pydicom, or ``encapsulated``: ``(syntax, pixel data already encoded in it)``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bonefrac-fuzz"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "HAND"
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    ds.PixelData = pixels.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    if syntax is not None:
        ds.compress(syntax, encoding_plugin="pylibjpeg" if "2000" in str(syntax.name) else "")
    if encapsulated is not None:
        meta.TransferSyntaxUID, ds.PixelData = encapsulated
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seed_files(data: Path) -> dict[str, bytes]:
    """Every clean original, from the radiographs in ``data``: ``{file name: bytes}`` (names
    say where each comes from)."""
    import pydicom

    seeds: dict[str, bytes] = {}
    for i, rel in enumerate(RADIOGRAPHS):
        im = _radiograph(data, rel)
        for name, encoded in {**_image_seeds(im), **_dicom_seeds(im)}.items():
            seeds[f"xray{i}_{name}"] = encoded
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    for name, _ in PYDICOM_SEEDS:
        seeds[f"pydicom_{name}"] = (folder / name).read_bytes()
    return seeds


def _write_all(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def write_seeds(folder: Path, data: Path) -> list[Path]:
    """The clean originals (from the radiographs in ``data``), written to ``folder``; their
    paths."""
    return _write_all(folder, seed_files(data))


# --------------------------------------------------------------------------------- mutations
def _pos(rng: random.Random, n: int) -> int:
    """An offset into ``n`` bytes, in the first ``HEAD`` bytes with probability 0.6."""
    return rng.randrange(min(n, HEAD) if rng.random() < 0.6 else n)


def bit_flips(b: bytearray, rng: random.Random, donors) -> str:
    k = rng.choice((1, 2, 4, 8, 32, 128))
    for _ in range(k):
        b[_pos(rng, len(b))] ^= 1 << rng.randrange(8)
    return f"flip{k}"


def byte_run(b: bytearray, rng: random.Random, donors) -> str:
    i, n = _pos(rng, len(b)), rng.choice((1, 4, 16, 64, 512))
    fill = rng.choice((0x00, 0xFF, 0x7F, 0x80, None))
    run = rng.randbytes(n) if fill is None else bytes([fill]) * n
    b[i:i + n] = run[:max(0, len(b) - i)]
    return "run"


def interesting(b: bytearray, rng: random.Random, donors) -> str:
    width, order = rng.choice((2, 4)), rng.choice("<>")
    value = rng.choice(INTERESTING) & (0xFFFF if width == 2 else 0xFFFFFFFF)
    i = _pos(rng, max(1, len(b) - width))
    b[i:i + width] = struct.pack(order + ("H" if width == 2 else "I"), value)
    return "int"


def truncate(b: bytearray, rng: random.Random, donors) -> str:
    cut = rng.randrange(len(b)) if rng.random() < 0.5 else len(b) - rng.randrange(1, 65)
    del b[max(1, cut):]
    return "trunc"


def splice(b: bytearray, rng: random.Random, donors) -> str:
    other = rng.choice(donors)
    k = rng.randrange(1, max(2, min(len(b), len(other), 4 * HEAD)))
    if rng.random() < 0.5:  # another file's header on this body
        b[:k] = other[:k]
    else:  # this header on another file's body
        b[k:] = other[k:]
    return "splice"


def duplicate(b: bytearray, rng: random.Random, donors) -> str:
    i = _pos(rng, len(b))
    n = rng.choice((4, 64, 1024))
    j = _pos(rng, len(b))
    b[j:j] = b[i:i + n]
    return "dup"


def delete(b: bytearray, rng: random.Random, donors) -> str:
    i = _pos(rng, len(b))
    del b[i:i + rng.choice((1, 4, 64, 1024))]
    return "del"


MUTATIONS: tuple[Callable, ...] = (bit_flips, byte_run, interesting, truncate, splice,
                                   duplicate, delete)


def mutate(data: bytes, rng: random.Random, donors: list[bytes]) -> tuple[bytes, str]:
    """1 to 3 stacked mutations of ``data``: (mutant, '+'-joined names of the mutations)."""
    b, ops = bytearray(data), []
    for _ in range(rng.choice((1, 1, 2, 3))):
        if len(b) < 2:
            break
        ops.append(rng.choice(MUTATIONS)(b, rng, donors))
    return bytes(b), "+".join(ops) or "none"


def write_mutants(folder: Path, n: int, seeds: dict[str, bytes], seed: int = 0,
                  start: int = 0) -> list[Path]:
    """Mutants ``start .. start + n - 1`` of ``seeds`` (:func:`seed_files`), named
    ``mNNNNN_<seed>_<ops><suffix>`` (the seed's own suffix, so that folder scans take them)."""
    names = sorted(seeds)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{i}")
        name = names[i % len(names)]
        kind = Path(name).suffix
        donors = [seeds[k] for k in names if Path(k).suffix == kind and k != name] or \
            [seeds[k] for k in names]
        data, ops = mutate(seeds[name], rng, donors)
        path = folder / f"m{i:05d}_{Path(name).stem}_{ops}{kind}"
        path.write_bytes(data)
        out.append(path)
    return out


# ------------------------------------------------------------------------------------ bombs
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w: int, h: int, depth: int = 8, rows: int | None = None) -> bytes:
    """A grey PNG of ``w`` x ``h`` whose IDAT inflates to ``rows`` (default: every) zero rows
    (a few KiB on disk for gigabytes of pixels); built in blocks, never whole in memory."""
    row = b"\x00" * (1 + w * depth // 8)
    z, parts, left = zlib.compressobj(9), [], h if rows is None else rows
    block = row * max(1, min(h, (8 << 20) // len(row)))
    rows_per_block = len(block) // len(row)
    while left > 0:
        take = min(left, rows_per_block)
        parts.append(z.compress(block[:take * len(row)]))
        left -= take
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def tiff_header_bomb(w: int, h: int) -> bytes:
    """A little-endian TIFF whose IFD claims ``w`` x ``h`` 8-bit pixels in one 16-byte strip."""
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, h),
               (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + b"\x00" * 16


def webp_header_bomb() -> bytes:
    """A lossless WebP (VP8L) claiming 16384 x 16384 pixels (the format's maximum)."""
    bits = (16384 - 1) | ((16384 - 1) << 14)  # 14-bit width-1, height-1, alpha 0, version 0
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 16
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_with_size(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` with its frame header (SOF0/SOF2) claiming ``w`` x ``h``."""
    b = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        i = b.find(marker)
        if i >= 0:
            b[i + 5:i + 9] = struct.pack(">HH", h, w)
            return bytes(b)
    raise ValueError("no SOF0/SOF2 frame header")


def j2k_with_tiles(j2k: bytes, w: int, h: int, tile: int) -> bytes:
    """A JPEG 2000 codestream (or JP2) whose SIZ marker claims ``w`` x ``h`` in ``tile`` px
    tiles (``tile=1``: one tile per pixel)."""
    b = bytearray(j2k)
    i = b.find(b"\xff\x51")  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz
    if i < 0:
        raise ValueError("no SIZ marker")
    b[i + 6:i + 38] = struct.pack(">IIIIIIII", w, h, 0, 0, tile, tile, 0, 0)
    return bytes(b)


def gif_header_bomb() -> bytes:
    """A GIF whose logical screen and image are 65535 x 65535."""
    return (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x08\x02\x4c\x01\x00;")


def dicom_rle_bomb(side: int = 8000) -> bytes:
    """A 16-bit ``side`` x ``side`` RLE DICOM of zeros: ~2 MB that decode to 128 MB, then the
    display transform's float copies (within the pixel cap: decoded or refused by memory)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    full, rest = divmod(side, 128)
    row = b"\x81\x00" * full + (bytes([257 - rest, 0]) if rest else b"")
    segment = row * side
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    frame = header + segment + segment
    data = _dicom_bytes(np.zeros((16, 16), np.uint16))
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = side
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_header_bomb(rows: int, cols: int, frames: int) -> bytes:
    """A DICOM whose header claims ``rows`` x ``cols`` x ``frames`` 16-bit pixels (billions)
    over a few bytes of pixel data."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dicom_bytes(np.zeros((16, 16), np.uint16))))
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bomb_files(data: Path) -> dict[str, bytes]:
    """Decompression bombs and absurd headers for each format (the JPEG and JPEG 2000 ones
    built on the first radiograph in ``data``): ``{file name: bytes}``."""
    small = _radiograph(data, RADIOGRAPHS[0])
    jpeg, j2k = _encoded(small, "JPEG"), _encoded(small, "JPEG2000", no_jp2=True)
    return {
        "bomb_png_100000x100000.png": png_bomb(100000, 100000, rows=4),
        "bomb_png_zeros_8000x8000.png": png_bomb(8000, 8000),
        "bomb_png16_zeros_8000x8000.png": png_bomb(8000, 8000, depth=16),
        "bomb_tiff_1000000x1000000.tif": tiff_header_bomb(1_000_000, 1_000_000),
        "bomb_tiff_8000x8000_short_strip.tif": tiff_header_bomb(8000, 8000),
        "bomb_tiff_deflate_zeros_8000x8000.tif": _encoded(
            Image.new("L", (8000, 8000)), "TIFF", compression="tiff_adobe_deflate"),
        "bomb_webp_16384x16384.webp": webp_header_bomb(),
        "bomb_jpeg_65500x65500.jpg": jpeg_with_size(jpeg, 65500, 65500),
        "bomb_jpeg_8000x8000_short_scan.jpg": jpeg_with_size(jpeg, 8000, 8000),
        "bomb_gif_65535x65535.gif": gif_header_bomb(),
        "bomb_j2k_8000x8000_1px_tiles.j2k": j2k_with_tiles(j2k, 8000, 8000, 1),
        "bomb_j2k_7900x7900_32px_tiles.j2k": j2k_with_tiles(j2k, 7900, 7900, 32),
        "bomb_j2k_7900x7900_one_tile.j2k": j2k_with_tiles(j2k, 7900, 7900, 7900),
        "bomb_j2k_65535x65535.j2k": j2k_with_tiles(j2k, 65535, 65535, 65535),
        "bomb_dicom_65535x65535x100000.dcm": dicom_header_bomb(65535, 65535, 100000),
        "bomb_dicom_65535x65535.dcm": dicom_header_bomb(65535, 65535, 1),
        "bomb_dicom_rle_zeros_8000x8000.dcm": dicom_rle_bomb(8000),
    }


def write_bombs(folder: Path, data: Path) -> list[Path]:
    """The decompression bombs (:func:`bomb_files` of ``data``), written to ``folder``; their
    paths."""
    return _write_all(folder, bomb_files(data))


def stop_server(proc, timeout: float = 30) -> None:
    """Stop a server subprocess as Ctrl-C would (SIGINT), killing it after ``timeout`` s."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(base: str, proc, timeout: float) -> bool:
    """Poll ``base/healthz`` until it answers 200 (True), or ``proc`` exits or ``timeout`` s
    pass (False)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


class HealthWatch:
    """``GET base/healthz`` every ``every`` s on a thread while the block runs; ``checks`` holds
    (answered 200, seconds) per probe."""

    def __init__(self, base: str, every: float = 0.25, timeout: float = 10):
        self.url, self.every, self.timeout = base + "/healthz", every, timeout
        self.checks: list[tuple[bool, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        import httpx

        while not self._stop.is_set():
            t = time.monotonic()
            try:
                ok = httpx.get(self.url, timeout=self.timeout).status_code == 200
            except httpx.TransportError:
                ok = False
            self.checks.append((ok, time.monotonic() - t))
            time.sleep(self.every)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_tiny_files(folder: Path, n: int = 10_000) -> list[Path]:
    """``n`` files of zero and one byte with image and DICOM suffixes, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    suffixes = (".jpg", ".png", ".dcm", ".tif", ".webp", "")
    out = []
    for i in range(n):
        p = folder / f"t{i:05d}{suffixes[i % len(suffixes)]}"
        with open(p, "wb") as f:
            f.write(b"" if i % 2 == 0 else bytes([i % 256]))
        out.append(p)
    return out


def file_count(folder: Path) -> int:
    return sum(1 for e in os.scandir(folder) if e.is_file())
