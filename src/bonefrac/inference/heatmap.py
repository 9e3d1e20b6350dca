"""Heat-map overlays as PNG figures (Pillow + numpy; no matplotlib, no torch).

:func:`render_overlay` draws one figure per image:

- the radiograph at its own size and aspect (``load_gray(path, None)``), with the map
  bilinearly upsampled to it and blended on as a jet colour ramp. The map covers the whole
  image: the model saw the image stretched to a square, so the map's fractions of width and
  height are the image's;
- the map's opacity is ``ALPHA`` when P(fractured) >= the threshold and
  ``ALPHA * P / threshold`` below it (:func:`map_opacity`): Grad-CAM maps are scaled to a peak
  of 1 whatever the prediction, so without the fade an image the model calls negative would show
  as hot as a positive one. The colour bar keeps the map's own 0..1 scale; the caption says when
  the map is faded;
- the localisation box (``box``: x0, y0, x1, y1 as fractions of width/height) as a rectangle
  and its peak (``peak``: x, y fractions) as a small cross, line widths growing with the image;
- a colour bar (0, 0.5, 1) in a margin on the right and a caption strip under the image:
  ``P(fractured) 0.83 | threshold 0.41 | fractured | RESEARCH USE ONLY``.

The figure is ``(W + bar margin, H + caption)`` for a ``(H, W)`` radiograph (wider where a
very small image's caption needs it); the image itself sits at its top-left corner, unscaled.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bonefrac.inference.localise import upsample
from bonefrac.utils import atomic_write

ALPHA = 0.4  # the map's opacity at and above the threshold
BOX_COLOUR = (255, 255, 255)  # jet blended on gray never gives pure white at full opacity
BACKGROUND = (20, 22, 25)  # the margins
TEXT_COLOUR = (235, 235, 235)
NOTICE = "RESEARCH USE ONLY"


def _jet(v: np.ndarray) -> np.ndarray:
    """Map [0, 1] -> RGB uint8 with a jet-like colour ramp."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


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
    """Grayscale ``(H, W)`` uint8 + map ``(h, w)`` in [0, 1] -> RGB blend of size (W, H)."""
    h, w = gray.shape
    colour = _jet(upsample_map(cam, (w, h))).astype(np.float32)
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return Image.fromarray(np.rint((1 - alpha) * base + alpha * colour).astype(np.uint8))


def heat_layer(cam: np.ndarray, size: tuple[int, int], *, prob: float, threshold: float,
               alpha: float = ALPHA) -> Image.Image:
    """The map alone as RGBA of ``size = (W, H)``: jet colours, uniform alpha
    :func:`map_opacity` (for a viewer that lays it over the radiograph itself)."""
    rgb = _jet(upsample_map(cam, size))
    a = np.full(rgb.shape[:2] + (1,), round(255 * map_opacity(prob, threshold, alpha)),
                np.uint8)
    return Image.fromarray(np.concatenate([rgb, a], axis=2), mode="RGBA")


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
                   decision: str, box: Sequence[float] | None = None,
                   peak: Sequence[float] | None = None) -> Image.Image:
    """The overlay figure (RGB): see the module docstring.

    Args:
        gray: ``(H, W)`` uint8, the radiograph at its own size (``load_gray(path, None)``).
        cam: ``(h, w)`` map in [0, 1] in the model's (square) frame.
        prob, threshold, decision: P(fractured), the decision threshold, the decision's label.
        box: (x0, y0, x1, y1), fractions of the image's width/height, or None.
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
    label_w = max(_text_size(probe, t, font)[0] for t in ("0", "0.5", "1"))
    bar_w = max(6, fs)
    margin = pad + bar_w + pad // 2 + label_w + pad
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

    if box is not None:
        draw.rectangle(_px_box(box, w, h), outline=BOX_COLOUR, width=lw)
    if peak is not None:
        cx = int(np.clip(float(peak[0]) * w, 0, w - 1))
        cy = int(np.clip(float(peak[1]) * h, 0, h - 1))
        arm = 3 * lw + max(2, side // 150)
        draw.line([(cx - arm, cy), (cx + arm, cy)], fill=BOX_COLOUR, width=lw)
        draw.line([(cx, cy - arm), (cx, cy + arm)], fill=BOX_COLOUR, width=lw)

    # colour bar: 1 at the top, 0 at the bottom, the jet ramp unfaded (the map's own scale)
    top = pad + fs // 2
    bottom = max(top + 2, h - pad - fs // 2)
    ramp = np.linspace(1, 0, bottom - top, dtype=np.float32)
    bar = np.repeat(_jet(ramp)[:, None, :], bar_w, axis=1)
    x_bar = w + pad
    fig.paste(Image.fromarray(bar), (x_bar, top))
    draw.rectangle([x_bar - 1, top - 1, x_bar + bar_w, bottom], outline=TEXT_COLOUR, width=1)
    for text, y in (("1", top), ("0.5", (top + bottom) / 2), ("0", bottom)):
        x0, y0, _, y1 = draw.textbbox((0, 0), text, font=font)
        draw.text((x_bar + bar_w + pad // 2 - x0, round(y - (y0 + y1) / 2)), text,
                  fill=TEXT_COLOUR, font=font)

    for k, line in enumerate(lines):
        draw.text((pad, h + pad + k * line_h), line, fill=TEXT_COLOUR, font=font)
    return fig


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(gray: np.ndarray, cam: np.ndarray, *, prob: float, threshold: float,
                decision: str, box: Sequence[float] | None = None,
                peak: Sequence[float] | None = None) -> bytes:
    """:func:`render_overlay` as PNG bytes."""
    return png_bytes(render_overlay(gray, cam, prob=prob, threshold=threshold,
                                    decision=decision, box=box, peak=peak))


def overlay_name(source: Path) -> str:
    """``<stem>_<hash8>_heatmap.png`` (the hash of the full path keeps names unique)."""
    tag = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    return f"{Path(source).stem}_{tag}_heatmap.png"


def save_overlay(gray: np.ndarray, cam: np.ndarray, out_dir: Path, source: Path, *,
                 prob: float, threshold: float, decision: str,
                 box: Sequence[float] | None = None,
                 peak: Sequence[float] | None = None) -> Path:
    """Write the :func:`render_overlay` figure to ``out_dir/<stem>_<hash8>_heatmap.png``
    atomically and return its path."""
    path = Path(out_dir) / overlay_name(Path(source))
    with atomic_write(path, "wb") as f:
        f.write(heatmap_png(gray, cam, prob=prob, threshold=threshold, decision=decision,
                            box=box, peak=peak))
    return path
