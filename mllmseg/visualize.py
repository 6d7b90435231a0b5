"""Mask overlays shared by `mllmseg segment`, the web demo and the quickstart, so they all look the same.

Each expression's mask is blended in its own colour (`mask_color(k)`) and outlined in that colour at full strength
(so a mask under a later one stays visible by its outline), its box is drawn in that colour and the expression is
written at the box's top-left corner, in a font scaled to the image (labels wider than the image are shortened with
"..."). Rejected expressions (`[REJ]`, "no such object") have nothing to draw: they are listed in a strip added
*below* the image, wrapped to its width, so the image area itself keeps its pixel coordinates (pixel (x, y) of the
overlay is pixel (x, y) of the input). `side_by_side` puts panels (ground truth, prediction) next to each other.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated, well-separated colours; the first ones are those the quickstart used before (magenta, cyan, yellow).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255),
    (0, 255, 255),
    (255, 255, 0),
    (255, 128, 0),
    (0, 255, 0),
    (0, 96, 255),
    (255, 0, 64),
    (160, 0, 255),
    (0, 160, 96),
    (255, 160, 200),
)
ALPHA = 0.55  # weight of the mask colour in the blend: strong enough to read, weak enough to see the object
BOX_WIDTH = 2
OUTLINE_WIDTH = 1
REJECTED_COLOR = (200, 200, 200)


def mask_color(index: int) -> tuple[int, int, int]:
    """The colour of the `index`-th expression (the palette repeats after len(PALETTE) expressions)."""
    return PALETTE[index % len(PALETTE)]


def blend(base, color, alpha: float = ALPHA) -> np.ndarray:
    """What a mask pixel becomes: `(1 - alpha) * base + alpha * color`, rounded to uint8 (tests use it too)."""
    base = np.asarray(base, dtype=np.float32)
    return np.clip(np.rint((1 - alpha) * base + alpha * np.asarray(color, dtype=np.float32)), 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray, width: int = OUTLINE_WIDTH) -> np.ndarray:
    """The pixels of a bool `[H, W]` mask within `width` pixels of its edge (the mask minus its erosion; the image
    border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def label_font(width: int, height: int):
    """Pillow's default font at a size that follows the image (about 1/28 of its shorter side, 9 to 40 px). Pillow
    before 10.1 has only the fixed-size bitmap default, which is used there."""
    size = int(min(40, max(9, round(min(width, height) / 28))))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with "..." until it is at most `width` pixels wide."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while len(text) > 1 and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` broken into lines at most `width` pixels wide (at spaces where possible, else inside a word)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if _text_size(draw, candidate, font)[0] <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while _text_size(draw, word, font)[0] > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and _text_size(draw, word[:cut], font)[0] > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return lines + ([line] if line else [])


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def draw_overlay(
    image,
    result,
    expressions: Sequence[str] | None = None,
    alpha: float = ALPHA,
    boxes: bool = True,
    labels: bool = True,
    outlines: bool = True,
) -> Image.Image:
    """Draw a `SegmentationResult` (anything with `masks` (E, h, w), `boxes` (E, 4), `rejected` (E,) and optionally
    `scores`) on `image` (PIL image, path or HWC array) and return a new RGB image.

    `expressions` defaults to `result.expressions`. Masks are blended in order, so where two masks overlap the later
    colour is blended on top of the earlier one; then every mask's outline is drawn in its full colour (`outlines`),
    so an earlier mask stays visible where a later one covers it.
    """
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    elif not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    base = image.convert("RGB")
    masks = _as_numpy(result.masks).astype(bool)
    rejected = _as_numpy(result.rejected).astype(bool).reshape(-1)
    box_array = _as_numpy(result.boxes).reshape(-1, 4)
    scores = getattr(result, "scores", None)
    scores = _as_numpy(scores).reshape(-1) if scores is not None else None
    expressions = list(expressions if expressions is not None else getattr(result, "expressions", []))
    count = len(rejected)
    if len(expressions) != count:
        expressions = expressions + [f"#{k}" for k in range(len(expressions), count)]
    if masks.shape[0] != count or (count and masks.shape[1:] != (base.height, base.width)):
        raise ValueError(f"{masks.shape[0]} masks of size {tuple(masks.shape[1:])} for {count} expressions on a "
                         f"{base.width}x{base.height} image; pass the result computed for this image")

    pixels = np.asarray(base, dtype=np.uint8).copy()
    for k in range(count):
        if not rejected[k] and masks[k].any():
            pixels[masks[k]] = blend(pixels[masks[k]], mask_color(k), alpha)
    drawn = [k for k in range(count) if not rejected[k] and masks[k].any()]
    if outlines:
        for k in drawn:
            pixels[mask_outline(masks[k])] = mask_color(k)
    out = Image.fromarray(pixels)
    draw = ImageDraw.Draw(out)
    font = label_font(out.width, out.height)

    # Boxes first, then every label, so no box line crosses a label.
    if boxes:
        for k in drawn:
            x0, y0, x1, y1 = (int(v) for v in box_array[k])
            draw.rectangle((x0, y0, x1, y1), outline=mask_color(k), width=BOX_WIDTH)
    if labels:
        placed: list[tuple[int, int, int, int]] = []
        for k in drawn:
            x0, y0 = int(box_array[k][0]), int(box_array[k][1])
            text = expressions[k] if scores is None else f"{expressions[k]} ({float(scores[k]):.2f})"
            text = _fit(draw, text, font, out.width - 4)
            tw, th = _text_size(draw, text, font)
            w, h = tw + 4, th + 4
            # Above the box when there is room, else just inside its top edge; kept inside the image horizontally.
            tx, ty = max(0, min(x0, out.width - w)), (y0 - h if y0 - h >= 0 else y0 + BOX_WIDTH)
            # Boxes often coincide (several expressions, one object): stack such labels instead of hiding one.
            while any(tx < px1 and px0 < tx + w and ty < py1 and py0 < ty + h for px0, py0, px1, py1 in placed):
                ty = max(py1 for px0, py0, px1, py1 in placed
                         if tx < px1 and px0 < tx + w and ty < py1 and py0 < ty + h)
            placed.append((tx, ty, tx + w, ty + h))
            draw.rectangle((tx, ty, tx + w - 1, ty + h - 1), fill=mask_color(k))
            draw.text((tx + 2, ty + 1), text, fill=(0, 0, 0), font=font)

    rejected_names = [expressions[k] for k in range(count) if rejected[k]]
    if rejected_names:
        lines = [part for name in rejected_names
                 for part in _wrap(draw, f"not found ([REJ]): {name}", font, out.width - 8)]
        line_h = max(_text_size(draw, line, font)[1] for line in lines) + 4
        strip = Image.new("RGB", (out.width, line_h * len(lines) + 4), (32, 32, 32))
        strip_draw = ImageDraw.Draw(strip)
        for i, line in enumerate(lines):
            strip_draw.text((4, 2 + i * line_h), line, fill=REJECTED_COLOR, font=font)
        framed = Image.new("RGB", (out.width, out.height + strip.height))
        framed.paste(out, (0, 0))
        framed.paste(strip, (0, out.height))
        out = framed
    return out


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str], gap: int = 4) -> Image.Image:
    """Panels (e.g. the ground truth and the prediction drawn by `draw_overlay`) left to right, each with its title
    above it; panels of different heights (a `[REJ]` strip) are top-aligned."""
    font = label_font(max(p.width for p in panels), max(p.height for p in panels))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = max(_text_size(probe, title, font)[1] for title in titles) + 6
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, title_h + max(p.height for p in panels)), (255, 255, 255))
    draw, x = ImageDraw.Draw(canvas), 0
    for panel, title in zip(panels, titles):
        draw.text((x + 2, 2), _fit(draw, title, font, panel.width - 4), fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, title_h))
        x += panel.width + gap
    return canvas


__all__ = ["PALETTE", "ALPHA", "mask_color", "blend", "mask_outline", "label_font", "draw_overlay", "side_by_side"]
