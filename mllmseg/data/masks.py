"""COCO segmentation -> binary mask, the way the `refer` toolkit (and MLLMSeg) rasterise it."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


# Polygon vertices may lie a little outside the image (COCO has some); far outside they only cost time and memory
# (pycocotools' rasteriser walks every pixel of the edge: 1e7 takes seconds and GBs, 1e9 crashes the process).
POLYGON_MARGIN = 0.5  # fraction of the image size


class BadSegmentationError(ValueError):
    """A segmentation that cannot be rasterised as it is (the message names the field and the value)."""


def validate_segmentation(segmentation, height: int, width: int) -> None:
    """Raise `BadSegmentationError` unless `segmentation` can be rasterised safely and faithfully: polygons of an even
    number (>= 6) of finite coordinates within `POLYGON_MARGIN` of the image; RLE of the image's size."""
    if isinstance(segmentation, list):
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, (list, tuple)) or any(isinstance(v, (list, tuple, dict)) for v in polygon):
                raise BadSegmentationError(f"polygon {k} is not a flat list of coordinates")
            try:
                coords = np.asarray(polygon, dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise BadSegmentationError(f"polygon {k} has non-numeric coordinates ({error})") from None
            if coords.size < 6 or coords.size % 2:
                raise BadSegmentationError(f"polygon {k} has {coords.size} values; a polygon needs an even number, "
                                           "at least 6 (three x, y points)")
            if not np.isfinite(coords).all():
                raise BadSegmentationError(f"polygon {k} has a non-finite coordinate (NaN or inf)")
            xs, ys = coords[0::2], coords[1::2]
            mx, my = POLYGON_MARGIN * width, POLYGON_MARGIN * height
            if xs.min() < -mx or xs.max() > width + mx or ys.min() < -my or ys.max() > height + my:
                raise BadSegmentationError(
                    f"polygon {k} reaches x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}, far outside "
                    f"the {width}x{height} image"
                )
    elif isinstance(segmentation, dict):
        size = segmentation.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and [int(v) for v in size] == [height, width]):
            raise BadSegmentationError(f"RLE size {size!r} is not the image's [height, width] = [{height}, {width}]")
        if "counts" not in segmentation:
            raise BadSegmentationError("RLE has no 'counts'")
    else:
        raise BadSegmentationError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) to a bool ``[H, W]`` mask.

    Multi-part objects are decoded part by part, summed and clamped to {0, 1}, as the reference does
    (``frPyObjects`` -> ``decode`` -> ``sum(axis=2)`` -> clamp), rather than merged with ``merge``. Validated
    first (`validate_segmentation`): a bad one raises `BadSegmentationError` instead of becoming an empty mask.
    """
    validate_segmentation(segmentation, height, width)
    if isinstance(segmentation, list):
        if len(segmentation) == 0:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rles = segmentation
    else:
        raise TypeError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    decoded = mask_utils.decode(rles)
    if decoded.ndim == 3:
        decoded = decoded.sum(axis=2)
    return decoded > 0
