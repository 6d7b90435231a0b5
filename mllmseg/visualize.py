"""Mask overlays shared by `mllmseg segment`, the web demo and the quickstart, so they all look the same.

Each expression's mask is blended in its own colour (`mask_color(k)`), its box is outlined in that colour and the
expression is written at the box's top-left corner. Rejected expressions (`[REJ]`, "no such object") have nothing
to draw: they are listed in a strip added *below* the image, so the image area itself keeps its pixel coordinates
(pixel (x, y) of the overlay is pixel (x, y) of the input).
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
REJECTED_COLOR = (200, 200, 200)


def mask_color(index: int) -> tuple[int, int, int]:
    """The colour of the `index`-th expression (the palette repeats after len(PALETTE) expressions)."""
    return PALETTE[index % len(PALETTE)]


def blend(base, color, alpha: float = ALPHA) -> np.ndarray:
    """What a mask pixel becomes: `(1 - alpha) * base + alpha * color`, rounded to uint8 (tests use it too)."""
    base = np.asarray(base, dtype=np.float32)
    return np.clip(np.rint((1 - alpha) * base + alpha * np.asarray(color, dtype=np.float32)), 0, 255).astype(np.uint8)


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
) -> Image.Image:
    """Draw a `SegmentationResult` (anything with `masks` (E, h, w), `boxes` (E, 4), `rejected` (E,) and optionally
    `scores`) on `image` (PIL image, path or HWC array) and return a new RGB image.

    `expressions` defaults to `result.expressions`. Masks are blended in order, so where two masks overlap the later
    colour is blended on top of the earlier one.
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
    out = Image.fromarray(pixels)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()

    # Boxes first, then every label, so no box line crosses a label.
    drawn = [k for k in range(count) if not rejected[k] and masks[k].any()]
    if boxes:
        for k in drawn:
            x0, y0, x1, y1 = (int(v) for v in box_array[k])
            draw.rectangle((x0, y0, x1, y1), outline=mask_color(k), width=BOX_WIDTH)
    if labels:
        placed: list[tuple[int, int, int, int]] = []
        for k in drawn:
            x0, y0 = int(box_array[k][0]), int(box_array[k][1])
            text = expressions[k] if scores is None else f"{expressions[k]} ({float(scores[k]):.2f})"
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
        lines = [f"not found ([REJ]): {name}" for name in rejected_names]
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


def result_records(result, expressions: Sequence[str] | None = None) -> list[dict]:
    """One JSON-ready dict per expression: expression, box (xyxy, inclusive pixel indices, None when rejected or
    empty), score, seg_prob, rejected, mask area, and the COCO RLE when the result carries one."""
    expressions = list(expressions if expressions is not None else result.expressions)
    masks = _as_numpy(result.masks).astype(bool)
    records = []
    for k, expression in enumerate(expressions):
        rejected = bool(_as_numpy(result.rejected)[k])
        area = int(masks[k].sum())
        record = {
            "expression": expression,
            "rejected": rejected,
            "box": None if rejected or area == 0 else [int(v) for v in _as_numpy(result.boxes)[k]],
            "score": round(float(_as_numpy(result.scores)[k]), 4),
            "seg_prob": (round(float(_as_numpy(result.seg_probs)[k]), 4)
                         if getattr(result, "seg_probs", None) is not None else None),
            "area": area,
        }
        if getattr(result, "rle", None) is not None:
            record["rle"] = result.rle[k]
        records.append(record)
    return records


__all__ = ["PALETTE", "ALPHA", "mask_color", "blend", "draw_overlay", "result_records"]
