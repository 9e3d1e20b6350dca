"""Heat-map overlays as PNG figures (Pillow + numpy; no matplotlib, no torch).

:func:`render_overlay` draws one figure per image:

- the radiograph at its own size and aspect (``load_gray(path, None)``), with the map
  bilinearly upsampled to it and blended on in the upper part of *inferno* (matplotlib's
  perceptually uniform map, :data:`INFERNO`, from purple to pale yellow): map values below
  :data:`LEVEL` are not drawn at all and the opacity ramps up over the next :data:`RAMP`, so the
  radiograph keeps its own grays wherever the model did not look (a jet ramp tinted the whole
  image dark blue). The map's fractions of width and height are the image's (a letterbox
  model's map is brought to the image's frame first);
- the map's opacity is ``ALPHA`` when P(fractured) >= the threshold and
  ``ALPHA * P / threshold`` below it (:func:`map_opacity`): Grad-CAM maps are scaled to a peak
  of 1 whatever the prediction, so without the fade an image the model calls negative would show
  as hot as a positive one. The colour bar keeps the map's own 0..1 scale; the caption says when
  the map is faded;
- the boxes to show (``boxes``: the row's shown detections, x0, y0, x1, y1 as fractions of
  width/height; see :mod:`bonefrac.inference.detections`) as rectangles labelled with rank and
  score, and the map's peak (``peak``: x, y fractions) as a small cross, line widths growing
  with the image;
- a colour bar titled "map" in a margin on the right, ticks 0, :data:`LEVEL`, 0.5 and 1, the
  part below :data:`LEVEL` drawn as the background (not drawn on the image), and a caption
  strip under the image: ``P(fractured) 0.83 | threshold 0.41 | fractured | RESEARCH USE
  ONLY``.

The figure is ``(W + bar margin, H + caption)`` for a ``(H, W)`` radiograph (wider where a
very small image's caption needs it); the image itself sits at its top-left corner, unscaled.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bonefrac.inference.localise import upsample
from bonefrac.utils import atomic_write

ALPHA = 0.4  # the map's opacity at and above the threshold
LEVEL = 0.2  # map values below this are transparent: the radiograph shows as it is
RAMP = 0.15  # the opacity grows from 0 at LEVEL to full at LEVEL + RAMP
BOX_COLOUR = (255, 255, 255)  # inferno blended on gray never gives pure white
BACKGROUND = (20, 22, 25)  # the margins
TEXT_COLOUR = (235, 235, 235)
NOTICE = "RESEARCH USE ONLY"
BAR_TITLE = "map"
# matplotlib's "inferno" at 17 evenly spaced points (RGB); a perceptually uniform map whose
# lightness rises monotonically, so a brighter colour always means a higher value.
INFERNO = np.array([
    (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110),
    (138, 34, 106), (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29),
    (249, 142, 9), (252, 172, 17), (249, 203, 53), (242, 234, 105), (252, 255, 164)],
    np.float32)
CMAP_START = 0.3  # the map at LEVEL starts at inferno(0.3), purple: its black end would darken


def colour_map(v: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] -> RGB uint8 ``v.shape + (3,)``: :data:`LEVEL` .. 1 spread over
    inferno from :data:`CMAP_START` to 1 (values below LEVEL get LEVEL's colour; they are
    transparent, :func:`pixel_opacity`)."""
    t = CMAP_START + (1 - CMAP_START) * np.clip((v - LEVEL) / (1 - LEVEL), 0, 1)
    x = np.linspace(0, 1, len(INFERNO))
    rgb = [np.interp(t, x, INFERNO[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, -1)).astype(np.uint8)


def pixel_opacity(v: np.ndarray) -> np.ndarray:
    """Per-pixel opacity factor in [0, 1]: 0 below :data:`LEVEL`, rising linearly to 1 at
    ``LEVEL + RAMP`` (no hard edge around the drawn region)."""
    return np.clip((np.asarray(v, np.float32) - LEVEL) / RAMP, 0, 1)


def map_opacity(prob: float, threshold: float, alpha: float = ALPHA) -> float:
    """The map's opacity: ``alpha`` at or above the threshold, ``alpha * prob / threshold``
    below it (so a negative image's map is faded in proportion, never stretched to full)."""
    if threshold <= 0 or prob >= threshold:
        return float(alpha)
    return float(alpha * max(0.0, float(prob)) / threshold)


def upsample_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` map -> ``(H, W)`` float32 in [0, 1] for ``size = (W, H)``, bilinear."""
    w, h = size
    return np.clip(upsample(np.clip(cam, 0, 1), (h, w)), 0, 1)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> Image.Image:
    """Grayscale ``(H, W)`` uint8 + map ``(h, w)`` in [0, 1] -> RGB blend of size (W, H):
    :func:`colour_map` at opacity ``alpha * pixel_opacity`` (pixels whose map value is below
    :data:`LEVEL` keep their gray exactly)."""
    h, w = gray.shape
    m = upsample_map(cam, (w, h))
    colour = colour_map(m).astype(np.float32)
    a = (alpha * pixel_opacity(m))[..., None]
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return Image.fromarray(np.rint((1 - a) * base + a * colour).astype(np.uint8))


def heat_layer(cam: np.ndarray, size: tuple[int, int], *, prob: float, threshold: float,
               alpha: float = ALPHA) -> Image.Image:
    """The map alone as RGBA of ``size = (W, H)`` (for a viewer that lays it over the
    radiograph itself): :func:`colour_map` colours, alpha :func:`map_opacity` times
    :func:`pixel_opacity` (transparent below :data:`LEVEL`)."""
    m = upsample_map(cam, size)
    a = np.rint(255 * map_opacity(prob, threshold, alpha) * pixel_opacity(m)).astype(np.uint8)
    return Image.fromarray(np.concatenate([colour_map(m), a[..., None]], axis=2), mode="RGBA")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _wrap(draw: ImageDraw.ImageDraw, parts: Sequence[str], font, width: int) -> list[str]:
    """Join caption parts with ' | ' into as few lines as fit in ``width`` pixels."""
    lines: list[str] = []
    for part in parts:
        if lines and _text_size(draw, lines[-1] + " | " + part, font)[0] <= width:
            lines[-1] += " | " + part
        else:
            lines.append(part)
    return lines


def caption_text(prob: float, threshold: float, decision: str) -> list[str]:
    """The caption's parts (joined with ' | ' on the figure)."""
    parts = [f"P(fractured) {prob:.2f}", f"threshold {threshold:.2f}", decision]
    if map_opacity(prob, threshold) < ALPHA:
        parts.append(f"map faded x{prob / threshold:.2f} (P below threshold)")
    return parts + [NOTICE]


def _px_box(box: Sequence[float], w: int, h: int) -> tuple[int, int, int, int]:
    """Fractions (x0, y0, x1, y1) -> inclusive pixel corners inside a (w, h) image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    px0 = int(np.clip(round(x0 * w), 0, w - 1))
    py0 = int(np.clip(round(y0 * h), 0, h - 1))
    px1 = int(np.clip(round(x1 * w) - 1, px0, w - 1))
    py1 = int(np.clip(round(y1 * h) - 1, py0, h - 1))
    return px0, py0, px1, py1


def line_width(w: int, h: int) -> int:
    """Box and cross line width for a (w, h) image: 1 px at 256 px, 8 px at 2048 px."""
    return max(1, round(max(w, h) / 256))


def render_overlay(gray: np.ndarray, cam: np.ndarray, *, prob: float, threshold: float,
                   decision: str, boxes: Sequence[Mapping] = (),
                   peak: Sequence[float] | None = None) -> Image.Image:
    """The overlay figure (RGB): see the module docstring.

    Args:
        gray: ``(H, W)`` uint8, the radiograph at its own size (``load_gray(path, None)``).
        cam: ``(h, w)`` map in [0, 1] in the model's (square) frame.
        prob, threshold, decision: P(fractured), the decision threshold, the decision's label.
        boxes: detections to draw (``x0``..``y1`` fractions of the image's width/height,
            ``rank``, ``score``), labelled "rank: score".
        peak: (x, y), fractions of the image's width/height, or None.
    """
    gray = np.asarray(gray, np.uint8)
    h, w = gray.shape
    side = max(w, h)
    fs = max(10, round(side / 40))  # font size in px
    pad = max(3, fs // 2)
    lw = line_width(w, h)
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    # the colour-bar margin on the right
    label_w = max(_text_size(probe, t, font)[0] for t, _ in BAR_TICKS)
    bar_w = max(6, fs)
    margin = pad + max(bar_w + pad // 2 + label_w, _text_size(probe, BAR_TITLE, font)[0]) + pad
    # the caption strip under the image, wrapped to the figure's width (a small image's figure
    # is widened so that each part of the caption fits on a line)
    parts = caption_text(prob, threshold, decision)
    fig_w = max(w + margin, 2 * pad + max(_text_size(probe, t, font)[0] for t in parts))
    lines = _wrap(probe, parts, font, fig_w - 2 * pad)
    line_h = round(fs * 1.3)
    cap_h = 2 * pad + line_h * len(lines)

    fig = Image.new("RGB", (fig_w, h + cap_h), BACKGROUND)
    fig.paste(overlay(gray, cam, map_opacity(prob, threshold)), (0, 0))
    draw = ImageDraw.Draw(fig)

    for d in boxes:
        x0, y0, x1, y1 = _px_box([d[k] for k in ("x0", "y0", "x1", "y1")], w, h)
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOUR, width=lw)
        label = f"{d['rank']}: {float(d['score']):.2f}"
        ty = y0 - fs - lw if y0 - fs - lw >= 0 else y1 + lw  # above the box, else below
        draw.text((x0, ty), label, fill=BOX_COLOUR, font=font)
    if peak is not None:
        cx = int(np.clip(float(peak[0]) * w, 0, w - 1))
        cy = int(np.clip(float(peak[1]) * h, 0, h - 1))
        arm = 3 * lw + max(2, side // 150)
        draw.line([(cx - arm, cy), (cx + arm, cy)], fill=BOX_COLOUR, width=lw)
        draw.line([(cx, cy - arm), (cx, cy + arm)], fill=BOX_COLOUR, width=lw)

    _draw_colour_bar(fig, draw, font, x=w + pad, title_y=pad // 2,
                     top=pad // 2 + round(fs * 1.3) + fs // 2, bottom=h - pad - fs // 2,
                     bar_w=bar_w, gap=pad // 2)

    for k, line in enumerate(lines):
        draw.text((pad, h + pad + k * line_h), line, fill=TEXT_COLOUR, font=font)
    return fig


BAR_TICKS = (("1", 1.0), ("0.5", 0.5), (f"{LEVEL:g}", LEVEL), ("0", 0.0))


def _draw_colour_bar(fig: Image.Image, draw: ImageDraw.ImageDraw, font, *, x: int,
                     title_y: int, top: int, bottom: int, bar_w: int, gap: int) -> None:
    """The colour bar at ``x``: map value 1 at ``top``, 0 at ``bottom``, each value drawn as
    on the image at full opacity over the background (so the part below :data:`LEVEL`, not
    drawn on the image, is background), outlined, titled at ``title_y`` and ticked
    (:data:`BAR_TICKS`; a tick that would overlap the one above it is left out)."""
    bottom = max(top + 2, bottom)
    v = np.linspace(1, 0, bottom - top, dtype=np.float32)
    a = pixel_opacity(v)[:, None]
    rgb = a * colour_map(v) + (1 - a) * np.array(BACKGROUND, np.float32)
    bar = np.repeat(np.rint(rgb).astype(np.uint8)[:, None, :], bar_w, axis=1)
    fig.paste(Image.fromarray(bar), (x, top))
    draw.rectangle([x - 1, top - 1, x + bar_w, bottom], outline=TEXT_COLOUR, width=1)
    x0, y0, _, _ = draw.textbbox((0, 0), BAR_TITLE, font=font)
    draw.text((x - x0, title_y - y0), BAR_TITLE, fill=TEXT_COLOUR, font=font)
    last = -1e9
    for text, value in BAR_TICKS:
        y = bottom - value * (bottom - top)
        x0, y0, _, y1 = draw.textbbox((0, 0), text, font=font)
        if y - last < 1.1 * (y1 - y0):
            continue
        draw.text((x + bar_w + gap - x0, round(y - (y0 + y1) / 2)), text, fill=TEXT_COLOUR,
                  font=font)
        last = y


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(gray: np.ndarray, cam: np.ndarray, *, prob: float, threshold: float,
                decision: str, boxes: Sequence[Mapping] = (),
                peak: Sequence[float] | None = None) -> bytes:
    """:func:`render_overlay` as PNG bytes."""
    return png_bytes(render_overlay(gray, cam, prob=prob, threshold=threshold,
                                    decision=decision, boxes=boxes, peak=peak))


def overlay_name(source: Path) -> str:
    """``<stem>_<hash8>_heatmap.png`` (the hash of the full path keeps names unique)."""
    tag = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    return f"{Path(source).stem}_{tag}_heatmap.png"


def save_overlay(gray: np.ndarray, cam: np.ndarray, out_dir: Path, source: Path, *,
                 prob: float, threshold: float, decision: str,
                 boxes: Sequence[Mapping] = (),
                 peak: Sequence[float] | None = None) -> Path:
    """Write the :func:`render_overlay` figure to ``out_dir/<stem>_<hash8>_heatmap.png``
    atomically and return its path."""
    path = Path(out_dir) / overlay_name(Path(source))
    with atomic_write(path, "wb") as f:
        f.write(heatmap_png(gray, cam, prob=prob, threshold=threshold, decision=decision,
                            boxes=boxes, peak=peak))
    return path
