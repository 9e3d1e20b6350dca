"""Every image a hospital produces, and hostile files: decoded exactly, or refused with a reason.

The decode of ordinary 8-bit JPEG/PNG files is pinned by sha256 (the models are trained on it).
The end-to-end test writes every case into one folder beside real radiographs and runs
``bonefrac predict`` on it: bad files become error rows, good files keep exactly the results of
a clean run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TEST_DATA, real_images
from PIL import Image, ImageFile

from bonefrac.data.io import MAX_PIXELS, MIN_SIDE, ImageReadError, load_gray
from bonefrac.inference.predict import list_inputs

# sha256 of load_gray(...).tobytes(), computed with the decoder the models were trained with
# (before this hardening). They depend on Pillow's bundled libjpeg: a Pillow upgrade that
# changes them changes what the models see, which is exactly what this must catch.
PINNED = [
    ("fractured/image1_0_png.rf.d29cab92b154a83ca5bf7e40083673a2.jpg", 96,
     "979a594ad5bfe0de2da13280ef617a70ddde037825f3cac0901782233025ab20"),
    ("fractured/image1_0_png.rf.d29cab92b154a83ca5bf7e40083673a2.jpg", 224,
     "62e62585a6bafeea1304d521b33f32b7336e85fad8eb304b19efd75b9ce1df8a"),
    ("fractured/image1_0_png.rf.d29cab92b154a83ca5bf7e40083673a2.jpg", 384,
     "c9d6028cda43a999ad57adcc1f5d19ad3afbf9649be949d3180065787e561fcb"),
    ("fractured/image1_1041_png.rf.8ec2085418990b1c04df373a9ad7d022.jpg", 96,
     "44adc50f9e5717e64bc9e1cb69cccbcb490652f6f7421d01411f05d5d3b3ff26"),
    ("fractured/image1_1041_png.rf.8ec2085418990b1c04df373a9ad7d022.jpg", 224,
     "0e86e503101c6adde87da4a29ae62ee568c785f9c007871d241fd9badccbda23"),
    ("fractured/image1_1041_png.rf.8ec2085418990b1c04df373a9ad7d022.jpg", 384,
     "fdf3ae18bd1596049b84d89a937675f1db10cf581cd2fc50f19c5c14744105f0"),
    ("non_fractured/image1_0_png.rf.208b9fc171409973fd0f9af79cdcfead.jpg", 96,
     "9bc231e69137f432f1b98178e79a045901cbd05ba1c1ed3eccea08844260b44e"),
    ("non_fractured/image1_0_png.rf.208b9fc171409973fd0f9af79cdcfead.jpg", 224,
     "45d188c78e1ecf4664271567794758795e8d547654f8dcae814c4e2da311539e"),
    ("non_fractured/image1_0_png.rf.208b9fc171409973fd0f9af79cdcfead.jpg", 384,
     "bed288fb879943a612deb1f47a01de7f39665ebca6e2bcdc89de9a3e1862e884"),
    ("non_fractured/image1_1030_png.rf.0462ed282e0ce5df186f6c3078dfb11e.jpg", 96,
     "a6770115cfaa50b7b38754c85572977ac02953c0c778c0d3cb5ce523db307c0e"),
    ("non_fractured/image1_1030_png.rf.0462ed282e0ce5df186f6c3078dfb11e.jpg", 224,
     "9edc08671076b513cf842758a65a3fe2384adb86fb55cdfa4fb4492dbff13aef"),
    ("non_fractured/image1_1030_png.rf.0462ed282e0ce5df186f6c3078dfb11e.jpg", 384,
     "42955d15e7ce127eeff958d0e2e3c98c521ff71663124b313ff3d47ad2ba21f8"),
]
# All 28 images of tests/data in sorted order, arrays concatenated.
PINNED_ALL = {96: "1f0809b2e6175b3a6e7b0fe9c609b4ca981cba2672df5cd94dc28a62dadbb061",
              224: "689e097df799df4e470812c3823053e3119fbfab83426f1a83a40ac4033897cc"}
# Lossless (PNG L/RGB/RGBA) and grayscale JPEG (baseline and progressive, quality 95) copies
# of the first two images, written by Pillow: {(image index, kind, size): sha256}.
PINNED_DERIVED = {
    (0, "png", 96): "6ad4e9dc5fd153a2706fc270da0132a8a67eb3d09711b05c089cc3f35e5d6b43",
    (0, "png", 224): "62e62585a6bafeea1304d521b33f32b7336e85fad8eb304b19efd75b9ce1df8a",
    (0, "gray_jpeg", 96): "5412f51c32abeee8eca69136fdec26045e8ee4df68bb7d865d8efaad28ccd4f7",
    (0, "gray_jpeg", 224): "92efe69e67c927d7b0ec0227cc84a903273ccd180c538ebeedac3b6b8cef9d97",
    (1, "png", 96): "e80cc50f1c229c73076ba101cb40b71b40687f48a0483fabafee8e2892e56e3f",
    (1, "png", 224): "90fd9022cf669f6214bc3b08ef06157bbb9b8afa513b0d2875442106bbd0b3e6",
    (1, "gray_jpeg", 96): "94c0307b0646251ac3c1aefc23a0a9796e388eff1c63523aa61b4f49a7f67f47",
    (1, "gray_jpeg", 224): "4547517bc4b517c894bfb089bf2d70ef06079172269626a0228ae111bd6ad19f",
}
NOT_AN_IMAGE = "not a recognised image format"


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def source(i: int = 0) -> Image.Image:
    """A real radiograph from tests/data, fully loaded (RGB, as stored)."""
    with Image.open(real_images()[i]) as im:
        im.load()
        return im


def save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    im.save(path, format=fmt, **kw)
    return path


def reason(path: Path, size: int = 64) -> str:
    with pytest.raises(ImageReadError) as e:
        load_gray(path, size, "stretch")
    assert e.value.path == str(path) and "\n" not in e.value.reason
    return e.value.reason


# ------------------------------------------------------------------------------- pins
@pytest.mark.parametrize(("rel", "size", "digest"), PINNED)
def test_real_jpeg_decode_is_unchanged(rel, size, digest):
    assert sha(load_gray(TEST_DATA / rel, size, "stretch")) == digest


@pytest.mark.parametrize("size", sorted(PINNED_ALL))
def test_all_real_images_decode_unchanged(size):
    h = hashlib.sha256()
    for f in real_images():
        h.update(load_gray(f, size, "stretch").tobytes())
    assert h.hexdigest() == PINNED_ALL[size]


@pytest.mark.parametrize("idx", [0, 1])
def test_derived_8bit_files_decode_unchanged(tmp_path, idx):
    im = source(idx)
    for size in (96, 224):
        for mode in ("L", "RGB", "RGBA"):
            f = save(im.convert(mode), tmp_path / f"{mode}.png")
            assert sha(load_gray(f, size, "stretch")) == PINNED_DERIVED[(idx, "png", size)], mode
        for progressive in (False, True):
            f = save(im.convert("L"), tmp_path / "g.jpg", quality=95, progressive=progressive)
            assert sha(load_gray(f, size, "stretch")) == PINNED_DERIVED[(idx, "gray_jpeg", size)]


# ------------------------------------------------------------------- formats decode
def reference(tmp_path: Path, g: np.ndarray, size: int = 96) -> np.ndarray:
    """load_gray of a lossless 8-bit grayscale PNG of ``g``."""
    return load_gray(save(Image.fromarray(g), tmp_path / "reference.png"), size, resize="stretch")


def gray(i: int = 0) -> np.ndarray:
    return np.asarray(source(i).convert("L"))


def stretched(i: int = 0) -> np.ndarray:
    """``gray(i)`` min-max stretched to 0..255, so a 16-bit copy (x 257) is exact."""
    g = gray(i).astype(np.float64)
    return np.round((g - g.min()) * 255 / (g.max() - g.min())).astype(np.uint8)


def test_lossless_formats_decode_like_png(tmp_path):
    g = gray(1)
    want = reference(tmp_path, g)
    im = Image.fromarray(g)
    palette = Image.frombytes("P", im.size, g.tobytes())
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    cases = {
        "bmp": save(im, tmp_path / "a.bmp"), "tif": save(im, tmp_path / "a.tif"),
        "lzw.tif": save(im, tmp_path / "b.tif", compression="tiff_lzw"),
        "webp": save(im.convert("RGB"), tmp_path / "a.webp", lossless=True),
        "gif": save(palette, tmp_path / "a.gif"), "palette.png": save(palette, tmp_path / "p.png"),
        "rgb.png": save(im.convert("RGB"), tmp_path / "rgb.png"),
        "la.png": save(im.convert("LA"), tmp_path / "la.png"),
        "rgba.png": save(im.convert("RGBA"), tmp_path / "rgba.png"),
        "pgm": save(im, tmp_path / "a.pgm"), "jp2": save(im, tmp_path / "a.jp2"),
    }
    for name, f in cases.items():
        assert np.array_equal(load_gray(f, 96, "stretch"), want), name


def test_transparent_regions_are_background(tmp_path):
    g = gray(1)
    alpha = np.full(g.shape, 255, np.uint8)
    alpha[:, : g.shape[1] // 2] = 0
    la = Image.merge("LA", [Image.fromarray(g), Image.fromarray(alpha)])
    black_left = g.copy()
    black_left[:, : g.shape[1] // 2] = 0
    assert np.array_equal(load_gray(save(la, tmp_path / "la.png"), 96, "stretch"),
                          reference(tmp_path, black_left))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_16bit_png_and_tiff_are_rescaled_not_clipped(tmp_path, bits):
    g = stretched(2)
    v = np.round(g.astype(np.float64) * (2**bits - 1) / 255).astype(np.uint16)
    want = reference(tmp_path, g)
    png = save(Image.fromarray(v), tmp_path / "a16.png")
    assert Image.open(png).mode == "I;16"
    tiff_be = save(Image.fromarray(v.astype(">u2")), tmp_path / "be.tif")
    assert Image.open(tiff_be).mode == "I;16B"
    cases = [png, save(Image.fromarray(v), tmp_path / "le.tif"), tiff_be,
             save(Image.fromarray(v.astype(np.int32)), tmp_path / "i32.tif"),
             save(Image.fromarray(v.astype(np.float32) / 7.0), tmp_path / "f32.tif")]
    for f in cases:  # 12-bit data in a 16-bit container is stretched, not left dark
        assert np.abs(load_gray(f, 96, "stretch").astype(int) - want).max() <= 1, f.name


def test_float_tiff_with_nan_does_not_poison_the_range(tmp_path):
    g = stretched(2)
    v = g.astype(np.float32) * 3.5
    v[:4, :4] = np.nan  # shown as the darkest value
    g[:4, :4] = 0
    got = load_gray(save(Image.fromarray(v), tmp_path / "nan.tif"), 96, resize="stretch")
    assert np.abs(got.astype(int) - reference(tmp_path, g)).max() <= 1
    all_nan = save(Image.fromarray(np.full((64, 64), np.nan, np.float32)), tmp_path / "n.tif")
    assert "no finite pixel values" in reason(all_nan)


def test_progressive_jpeg_decodes_like_baseline(tmp_path):
    im = source(3)
    base = save(im, tmp_path / "base.jpg", quality=90)
    prog = save(im, tmp_path / "prog.jpg", quality=90, progressive=True)
    assert Image.open(prog).info.get("progressive")
    for size in (96, 224):
        assert np.array_equal(load_gray(prog, size, "stretch"), load_gray(base, size, "stretch"))


def test_cmyk_jpeg_decodes_close_to_its_source(tmp_path):
    g = gray(3)
    f = save(Image.fromarray(g).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(f).mode == "CMYK"
    got = load_gray(f, 96, "stretch").astype(int)
    want = reference(tmp_path, g).astype(int)
    assert np.abs(got - want).mean() < 2.0 and np.corrcoef(got.ravel(), want.ravel())[0, 1] > .99


# EXIF orientation -> the transpose that stores an upright image so that it displays upright.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    g = gray(2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(g).transpose(STORED_AS[orientation])
    upright = reference(tmp_path, g).astype(int)
    as_stored = reference(tmp_path, np.asarray(stored)).astype(int)
    png = load_gray(save(stored, tmp_path / "o.png", exif=exif), 96, "stretch")
    assert np.array_equal(png, upright)
    # JPEG is lossy and its blocks fall elsewhere once rotated: close to upright, far from
    # the pixels as stored.
    jpg = load_gray(save(stored, tmp_path / "o.jpg", exif=exif, quality=95), 96, "stretch")
    jpg = jpg.astype(int)
    assert np.abs(jpg - upright).mean() < 2 < np.abs(jpg - as_stored).mean()


def test_wrong_extension_is_sniffed_from_content(tmp_path):
    g = gray(1)
    want = reference(tmp_path, g)
    assert np.array_equal(load_gray(save(Image.fromarray(g), tmp_path / "png.jpg", "PNG"), 96,
                                    "stretch"),
                          want)
    jpg = save(source(1), tmp_path / "real.jpg", "JPEG", quality=95)
    shutil.copy(jpg, tmp_path / "jpeg.png")
    assert np.array_equal(load_gray(tmp_path / "jpeg.png", 96, "stretch"),
                          load_gray(jpg, 96, "stretch"))
    (tmp_path / "text.jpg").write_text("this is not a radiograph\n")
    assert NOT_AN_IMAGE in reason(tmp_path / "text.jpg")


def test_paths_with_spaces_and_unicode(tmp_path):
    d = tmp_path / "Röntgen Abteilung" / "骨折 films"
    d.mkdir(parents=True)
    f = shutil.copy(real_images()[0], d / "hand film ñ 1.JPG")
    assert np.array_equal(load_gray(f, 96, "stretch"), load_gray(real_images()[0], 96, "stretch"))


# ------------------------------------------------------------------- refused, clearly
def png_bytes(width: int, height: int, bit_depth: int = 8, rows: bytes | None = None) -> bytes:
    """A grayscale PNG built chunk by chunk, so headers can lie about the size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    idat = zlib.compress(rows or b"", 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(width: int = 9000, height: int = 8000) -> bytes:
    """A VALID 1-bit PNG of ``width x height`` zeros: ~10 kB on disk, 72 MP once decoded."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    png = png_bytes(width, height, 1)
    start = png.index(b"IDAT") - 4
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + data) & 0xFFFFFFFF)
    return png[:start] + struct.pack(">I", len(data)) + b"IDAT" + data + crc + png[-12:]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF header claims another size."""
    buf = io.BytesIO()
    source(0).save(buf, "JPEG", quality=80)
    b = bytearray(buf.getvalue())
    sof = b.index(b"\xff\xc0")
    b[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(b)


def truncated(data: bytes, frac: float = 0.6) -> bytes:
    return data[: int(len(data) * frac)]


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    f = tmp_path / "bomb.png"
    f.write_bytes(bomb_png())
    assert f.stat().st_size < 100_000
    with Image.open(f) as im:  # really 9000x8000, and Pillow alone would decode it
        assert im.size == (9000, 8000) and MAX_PIXELS < 9000 * 8000
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self) or pytest.fail("decoded a bomb"))
    assert "too large: 9000x8000" in reason(f)
    assert not loads


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("name", "data", "expected"), [
    ("huge_header.png", png_bytes(100_000, 100_000), "too large"),
    ("huge_sof.jpg", jpeg_with_size(60_000, 60_000), "too large"),
    ("long_strip.png", png_bytes(70_000_000, 1), "too large"),
    ("one_pixel.png", png_bytes(1, 1, rows=b"\0\x80"), "too small: 1x1"),
    ("thin.png", png_bytes(MIN_SIDE - 1, 400, rows=(b"\0" + b"\x80" * 15) * 400),
     f"too small: {MIN_SIDE - 1}x400"),
    ("empty.jpg", b"", "empty file (0 bytes)"),
    ("text.png", b"Not an image, just text.\n" * 10, NOT_AN_IMAGE),
    ("html.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", NOT_AN_IMAGE),
])
def test_hostile_headers_and_contents(tmp_path, name, data, expected):
    f = tmp_path / name
    f.write_bytes(data)
    assert expected in reason(f)


def test_smallest_accepted_size(tmp_path):
    f = save(Image.fromarray(np.full((MIN_SIDE, MIN_SIDE), 7, np.uint8)), tmp_path / "s.png")
    assert load_gray(f, 32, "stretch").shape == (32, 32)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_refused(tmp_path, seed):
    f = tmp_path / f"random{seed}.jpg"
    f.write_bytes(np.random.default_rng(seed).bytes(4096))
    assert NOT_AN_IMAGE in reason(f)


@pytest.mark.parametrize(("fmt", "kw"), [("JPEG", {}), ("JPEG", {"progressive": True}),
                                         ("PNG", {}), ("TIFF", {}), ("WEBP", {}),
                                         ("BMP", {}), ("GIF", {}), ("JPEG2000", {})])
@pytest.mark.parametrize("frac", [0.3, 0.9, 0.99])
def test_truncated_files_are_refused(tmp_path, monkeypatch, fmt, kw, frac):
    data = encoded(source(1), fmt, **kw)
    f = tmp_path / f"cut.{fmt.lower()}"
    f.write_bytes(truncated(data, frac))
    # Another library may have switched Pillow to padding truncated images with gray.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    r = reason(f)
    assert r.startswith(("cannot decode image", NOT_AN_IMAGE)), r
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_says_truncated(tmp_path):
    f = tmp_path / "cut.jpg"
    f.write_bytes(truncated(encoded(source(1), "JPEG")))
    assert "image file is truncated" in reason(f)


def test_symlinks(tmp_path):
    good = shutil.copy(real_images()[0], tmp_path / "good.jpg")
    (tmp_path / "link.jpg").symlink_to(good)
    assert np.array_equal(load_gray(tmp_path / "link.jpg", 96, "stretch"),
                          load_gray(good, 96, "stretch"))
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    assert reason(tmp_path / "dangling.jpg") == (
        f"broken symbolic link (target {tmp_path / 'gone.jpg'} does not exist)")
    (tmp_path / "loop_a.jpg").symlink_to(tmp_path / "loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to(tmp_path / "loop_a.jpg")
    assert reason(tmp_path / "loop_a.jpg") == (
        "cannot read file: Too many levels of symbolic links")


def test_special_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # opening a FIFO for reading would block forever
    assert reason(tmp_path / "pipe.jpg") == "not a regular file (device, FIFO or socket)"
    (tmp_path / "folder.jpg").mkdir()
    assert reason(tmp_path / "folder.jpg") == "is a directory"
    assert reason(tmp_path / "missing.jpg") == "file not found"


def test_list_inputs_never_follows_directory_symlinks(tmp_path):
    shutil.copy(real_images()[0], tmp_path / "a.jpg")
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copy(real_images()[1], sub / "b.jpg")
    (sub / "loop").symlink_to(tmp_path, target_is_directory=True)  # sub/loop/sub/loop/...
    (tmp_path / "self").symlink_to(".", target_is_directory=True)
    files, errors = list_inputs([tmp_path])
    assert files == [tmp_path / "a.jpg", sub / "b.jpg"] and errors == []


def _readable_by_nobody(path: Path) -> bool:
    """Every folder above ``path`` can be traversed by other users."""
    return all(os.stat(p).st_mode & 0o001 for p in [*path.parents])


def test_unreadable_file(tmp_path):
    """chmod 000 blocks reads for ordinary users only: as root, the read runs in a child
    process that has dropped to user 'nobody' (a real permission check, not a mock)."""
    if os.geteuid() != 0:
        f = shutil.copy(real_images()[0], tmp_path / "locked.jpg")
        os.chmod(f, 0)
        try:
            assert reason(Path(f)) == "permission denied"
        finally:
            os.chmod(f, 0o644)
        return
    d = Path(tempfile.mkdtemp(prefix="bonefrac_perm_"))
    try:
        os.chmod(d, 0o755)
        f = Path(shutil.copy(real_images()[0], d / "locked.jpg"))
        os.chmod(f, 0)
        if not _readable_by_nobody(f):
            pytest.skip(f"{d} is not reachable by user nobody")
        # Import first (the interpreter may live where nobody cannot read), then drop root.
        code = ("import os\nfrom bonefrac.data.io import load_gray, ImageReadError\n"
                "os.setgid(65534)\nos.setuid(65534)\n"
                f"try:\n    load_gray({str(f)!r}, 64, 'stretch')\n"
                "except ImageReadError as e:\n    print(e.reason)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, cwd=d,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "permission denied"
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- end to end (CLI)
def write_every_case(d: Path) -> tuple[list[Path], dict[Path, str]]:
    """Fill ``d`` with good files (real radiographs in every format) and bad ones.

    Returns (good files, {bad file: expected text in its reason}).
    """
    from test_dicom import BASIC_TEXT_SR, write_dicom

    d.mkdir(parents=True, exist_ok=True)
    good: list[Path] = []
    bad: dict[Path, str] = {}

    def put_good(name: str, im: Image.Image | None = None, fmt: str | None = None, **kw):
        good.append(save(im, d / name, fmt, **kw))

    def put_bad(name: str, data: bytes, expected: str):
        (d / name).write_bytes(data)
        bad[d / name] = expected

    for i, f in enumerate(real_images()[::5]):  # real films, awkward names
        good.append(Path(shutil.copy(f, d / f"film {i} 骨折 ü.jpg")))
    im, g = source(2), gray(2)
    v16 = np.round(stretched(2).astype(np.float64) * 4095 / 255).astype(np.uint16)
    put_good("gray.png", im.convert("L"))
    put_good("palette.png", im.convert("P"))
    put_good("gray_alpha.png", im.convert("LA"))
    put_good("rgba.png", im.convert("RGBA"))
    put_good("png16.png", Image.fromarray(v16))
    put_good("tiff16.tif", Image.fromarray(v16))
    put_good("tiff16be.tiff", Image.fromarray(v16.astype(">u2")))
    put_good("bmp.bmp", im)
    put_good("webp.webp", im)
    put_good("gif.gif", im.convert("P"))
    put_good("progressive.jpg", im, "JPEG", progressive=True, quality=90)
    put_good("cmyk.jpg", im.convert("CMYK"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    put_good("exif_rotated.jpg", Image.fromarray(g).transpose(Image.Transpose.ROTATE_90),
             "JPEG", exif=exif)
    put_good("png_named.jpg", im, "PNG")
    put_good("jpeg_named.png", im, "JPEG")
    put_good("UPPER.JPG", im, "JPEG")
    good.append(write_dicom(d / "mono2.dcm", g))
    good.append(write_dicom(d / "IM_MONO1_NOEXT", 255 - g, photometric="MONOCHROME1"))
    good.append(write_dicom(d / "ct_like.dcm", v16, bits_stored=12, WindowCenter=2048,
                            WindowWidth=4096, RescaleSlope=1, RescaleIntercept=-1024))
    (d / "link_to_good.jpg").symlink_to(good[0])
    good.append(d / "link_to_good.jpg")

    jpg = encoded(im, "JPEG")
    put_bad("empty.jpg", b"", "empty file (0 bytes)")
    put_bad("truncated.jpg", truncated(jpg), "image file is truncated")
    put_bad("truncated_progressive.jpg", truncated(encoded(im, "JPEG", progressive=True)),
            "truncated")
    put_bad("truncated.png", truncated(encoded(im, "PNG")), "cannot decode image")
    put_bad("truncated.tif", truncated(encoded(im, "TIFF")), "cannot decode image")
    put_bad("text.jpg", b"Patient list - do not distribute\n" * 5, NOT_AN_IMAGE)
    put_bad("random.png", np.random.default_rng(0).bytes(10_000), NOT_AN_IMAGE)
    put_bad("RANDOM_NOEXT", np.random.default_rng(1).bytes(10_000), NOT_AN_IMAGE)
    put_bad("bomb.png", bomb_png(), "too large: 9000x8000")
    put_bad("huge_header.png", png_bytes(100_000, 100_000), "too large")
    put_bad("huge_sof.jpg", jpeg_with_size(60_000, 60_000), "too large")
    put_bad("one_pixel.png", png_bytes(1, 1, rows=b"\0\x80"), "too small: 1x1")
    write_dicom(d / "report.dcm", None, sop_class=BASIC_TEXT_SR)
    bad[d / "report.dcm"] = "no pixel data"
    cine = write_dicom(d / "cine.dcm", np.concatenate([g, g]))
    import pydicom

    ds = pydicom.dcmread(cine)
    ds.Rows, ds.NumberOfFrames = g.shape[0], 2
    ds.save_as(cine)
    bad[cine] = "multi-frame DICOM (2 frames)"
    put_bad("notes.dcm", b"Radiology notes, no image.\n" * 20,
            "neither a recognised image format nor a DICOM file")
    (d / "dangling.jpg").symlink_to(d / "deleted.jpg")
    bad[d / "dangling.jpg"] = "broken symbolic link"
    (d / "loop_a.jpg").symlink_to(d / "loop_b.jpg")
    (d / "loop_b.jpg").symlink_to(d / "loop_a.jpg")
    bad[d / "loop_a.jpg"] = bad[d / "loop_b.jpg"] = "Too many levels of symbolic links"
    os.mkfifo(d / "fifo.jpg")
    bad[d / "fifo.jpg"] = "not a regular file"
    if os.geteuid() != 0:  # root reads chmod-000 files; see test_unreadable_file
        put_bad("locked.jpg", jpg, "permission denied")
        os.chmod(d / "locked.jpg", 0)
    sub = d / "sub"
    sub.mkdir()
    (sub / "loop").symlink_to(d, target_is_directory=True)  # never followed
    (d / ".hidden.jpg").write_bytes(b"junk")  # skipped: hidden
    (d / "readme.txt").write_text("skipped: not an image suffix")
    return good, bad


def run_predict(inputs: list[Path], model: Path, out: Path, capsys) -> tuple[int, str]:
    from bonefrac.cli.main import main

    code = main(["predict", *map(str, inputs), "--model", str(model), "--out", str(out),
                 "--quiet", "--batch-size", "64", "--threads", "1"])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_predict_on_a_folder_of_every_case(tmp_path, tiny_ensemble, capsys):
    good, bad = write_every_case(tmp_path / "in")
    missing = tmp_path / "not_there.jpg"
    code, err = run_predict([tmp_path / "in", missing], tiny_ensemble, tmp_path / "out", capsys)
    assert code == 3
    assert "Traceback" not in err

    out = json.loads((tmp_path / "out" / "predictions.json").read_text())
    errors = {e["file"]: e["reason"] for e in out["errors"]}
    with open(tmp_path / "out" / "errors.csv", newline="") as fh:
        assert {r["file"]: r["reason"] for r in csv.DictReader(fh)} == errors
    assert errors.pop(str(missing)) == "no such file or folder"
    for f, expected in bad.items():
        assert expected in errors[str(f)], (f.name, errors[str(f)])
        assert f"error: {f}: {errors[str(f)]}" in err  # one line per bad file on stderr
    assert set(errors) == {str(f) for f in bad}

    rows = out["predictions"]
    files = [r["file"] for r in rows]
    assert sorted(files) == sorted(map(str, good)) and len(set(files)) == len(files)
    assert all(0.0 <= r["prob_fractured"] <= 1.0 for r in rows)
    assert out["n_ok"] == len(good) and out["n_failed"] == len(bad) + 1

    # A clean run on the good files alone gives byte-identical rows.
    code, err = run_predict([Path(f) for f in files], tiny_ensemble, tmp_path / "clean", capsys)
    assert code == 0, err
    assert ((tmp_path / "clean" / "predictions.csv").read_bytes()
            == (tmp_path / "out" / "predictions.csv").read_bytes())
    assert json.loads((tmp_path / "clean" / "predictions.json").read_text())["predictions"] == rows


def test_non_utf8_file_name_does_not_lose_results(tmp_path, tiny_ensemble, capsys):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(real_images()[0], d / "good.jpg")
    shutil.copy(real_images()[1], os.fsdecode(bytes(d) + b"/bad_\xff.jpg"))
    code, err = run_predict([d], tiny_ensemble, tmp_path / "out", capsys)
    assert "Traceback" not in err
    assert code == 0, err
    out = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert out["n_ok"] == 2


def test_training_and_prediction_scans_take_the_same_image_suffixes(tmp_path):
    """One suffix list (bonefrac.data.io.IMAGE_SUFFIXES) for training folders and prediction;
    prediction alone also tries suffix-less files (DICOM exports often have none)."""
    from bonefrac.data.dataset import scan_folder

    names = ["a.JPG", "b.gif", "c.dicom", "d.jp2", "e.pgm", "f.txt", "g.csv", "noext",
             ".hidden.png"]
    for cls in ("fractured", "non_fractured"):
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(b"x")
    trained = sorted(s.rel for s in scan_folder(tmp_path))
    files, _ = list_inputs([tmp_path])
    predicted = sorted(p.relative_to(tmp_path).as_posix() for p in files)
    images = ["a.JPG", "b.gif", "c.dicom", "d.jp2", "e.pgm"]
    assert trained == sorted(f"{c}/{n}" for c in ("fractured", "non_fractured") for n in images)
    assert predicted == sorted(trained + ["fractured/noext", "non_fractured/noext"])
