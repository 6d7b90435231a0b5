"""Overlays (`mllmseg.visualize`): overlapping masks stay visible by their outlines, labels and the [REJ] strip fit
small images, fonts follow the image size, and panels compose side by side."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mllmseg.data.records import box_from_mask
from mllmseg.visualize import (_fit, _text_size, _wrap, blend, draw_overlay, label_font, mask_color, mask_outline,
                               side_by_side)


def _result(masks, rejected=None, expressions=None):
    masks = np.asarray(masks, dtype=bool)
    n = len(masks)
    return SimpleNamespace(masks=masks, boxes=box_from_mask(masks), rejected=np.zeros(n, bool) if rejected is None
                           else np.asarray(rejected), scores=None, expressions=expressions or [f"e{k}" for k in range(n)])


def test_outline_is_the_mask_minus_its_erosion():
    mask = np.zeros((8, 9), dtype=bool)
    mask[2:7, 1:6] = True
    outline = mask_outline(mask)
    inner = np.zeros_like(mask)
    inner[3:6, 2:5] = True
    np.testing.assert_array_equal(outline, mask & ~inner)
    full = np.ones((4, 4), dtype=bool)  # the image border counts as outside
    assert mask_outline(full).sum() == 12 and not mask_outline(np.zeros((4, 4), bool)).any()


def test_a_mask_under_a_later_one_keeps_its_outline():
    image = Image.new("RGB", (80, 60), (90, 90, 90))
    small = np.zeros((60, 80), dtype=bool)
    small[20:40, 20:40] = True
    big = np.zeros((60, 80), dtype=bool)
    big[10:50, 10:70] = True  # covers the first mask entirely
    out = np.asarray(draw_overlay(image, _result([small, big]), boxes=False, labels=False))
    edge = mask_outline(small)
    assert (out[edge] == mask_color(0)).all()  # the covered mask is visible by its outline
    inside = small & ~edge
    once = blend(np.asarray(image), mask_color(0))
    np.testing.assert_array_equal(out[inside], blend(once, mask_color(1))[inside])  # fills blend as before
    hidden = np.asarray(draw_overlay(image, _result([small, big]), boxes=False, labels=False, outlines=False))
    assert not (hidden[edge] == mask_color(0)).all(-1).any()  # without outlines it was not


def test_labels_and_the_rejected_strip_fit_a_small_image():
    image = Image.new("RGB", (60, 40), (0, 0, 0))
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:30, 5:25] = True
    long_name = "the very long referring expression that cannot fit at all"
    result = _result([mask, np.zeros((40, 60), bool)], rejected=[False, True], expressions=[long_name, long_name])
    out = draw_overlay(image, result)
    assert out.width == 60
    draw = ImageDraw.Draw(out)
    font = label_font(60, 40)
    lines = _wrap(draw, f"not found ([REJ]): {long_name}", font, 60 - 8)
    assert len(lines) >= 3 and all(_text_size(draw, line, font)[0] <= 52 for line in lines)
    assert "".join(lines).replace(" ", "") == f"not found ([REJ]): {long_name}".replace(" ", "")  # nothing dropped
    line_h = max(_text_size(draw, line, font)[1] for line in lines) + 4
    assert out.height == 40 + line_h * len(lines) + 4  # every wrapped line has its row in the strip
    strip = np.asarray(out)[40:]
    for i in range(len(lines)):  # and text in each row
        band = strip[2 + i * line_h: 2 + (i + 1) * line_h]
        assert (band != (32, 32, 32)).any()
    label = _fit(draw, f"{long_name}", font, 56)
    assert label.endswith("...") and _text_size(draw, label, font)[0] <= 56


@pytest.mark.skipif(not hasattr(__import__("PIL.ImageFont").ImageFont, "FreeTypeFont")
                    or __import__("PIL").__version__ < "10.1", reason="Pillow < 10.1 has one bitmap font size")
def test_label_font_follows_the_image_size():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    small, large = _text_size(draw, "Ag", label_font(112, 112)), _text_size(draw, "Ag", label_font(1120, 1120))
    assert large[1] > 2 * small[1]


def test_side_by_side_pastes_each_panel_under_its_title():
    a = Image.new("RGB", (30, 20), (255, 0, 0))
    b = Image.new("RGB", (40, 25), (0, 0, 255))
    out = side_by_side([a, b], ["truth", "prediction"], gap=4)
    arr = np.asarray(out)
    assert out.width == 74
    top = out.height - 25
    assert (arr[top:top + 20, :30] == (255, 0, 0)).all() and (arr[top:, 34:] == (0, 0, 255)).all()
    assert (arr[:top, :30] != 255).any()  # the title is written
