"""COCO segmentation -> binary mask, the way the `refer` toolkit (and MLLMSeg) rasterise it."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) to a bool ``[H, W]`` mask.

    Multi-part objects are decoded part by part, summed and clamped to {0, 1}, as the reference does
    (``frPyObjects`` -> ``decode`` -> ``sum(axis=2)`` -> clamp), rather than merged with ``merge``.
    """
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
