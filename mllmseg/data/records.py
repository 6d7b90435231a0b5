"""The record every referring-segmentation loader yields.

One :class:`ReferringSample` per image, holding one :class:`Referent` per expression. RES samples have one
target per referent, GRES samples may have several (``mask`` is their union) or none (``no_target=True``,
empty mask, ``box=None``); REC uses ``box``.

Box convention: ``(x1, y1, x2, y2)`` in pixels, continuous coordinates (COCO ``[x, y, w, h]`` becomes
``[x, y, x + w, y + h]``; a mask's box covers its pixels, so its right edge is ``max column + 1``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..remote_code.image_processing_mllmseg import to_rgb

Box = Tuple[float, float, float, float]

ON_BAD_RECORD = ("error", "skip")


def sample_index(index: int, length: int) -> int:
    """`index` (negative counts from the end) as a position in a sequence of `length` samples, or IndexError."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(f"index {index} out of range for {length} samples")
    return position


class BadRecordError(ValueError):
    """An annotation record that cannot be used as it is. The message names the file (or dataset), the record
    (position, ref / ann / image id) and the field."""


def check_on_bad_record(value: str, name: str = "on_bad_record") -> str:
    """`"error"` (stop at the first bad record) or `"skip"` (leave it out and count it); anything else is refused
    (the message calls the setting `name`)."""
    if value not in ON_BAD_RECORD:
        raise ValueError(f"{name} must be 'error' or 'skip', got {value!r}")
    return value


def skipped_records(samples) -> List[str]:
    """The messages of the records a loader left out (`on_bad_record="skip"`), for one loader or a
    `torch.utils.data.ConcatDataset` of them; loaders that skip nothing (synthetic) contribute none."""
    parts = getattr(samples, "datasets", None) or [samples]
    return [message for part in parts for message in getattr(part, "skipped", [])]


# ---------------------------------------------------------------------------------------------------- image files

MISSING_SHOWN = 3  # missing paths named in the error
LAYOUT_PROBES = 5  # missing images an alternative layout must find before it is suggested
# Folders that stand in for all but the last folder of an image's path in layouts people commonly have: the refer /
# LISA tree (images/mscoco/images/train2014), the jxu124/refcoco image_path (coco/train2014), images/train2014. Leading
# folders dropped (down to the plain COCO train2014/ and a flat folder) are tried as well.
COMMON_IMAGE_PREFIXES = (("images", "mscoco", "images"), ("coco",), ("images",))


def missing_files(paths: Iterable[Path]) -> List[Path]:
    """The paths that are not files (one ``stat`` each: about 0.15 s for 20k images on a local disk)."""
    return [path for path in paths if not os.path.isfile(path)]


@dataclass(frozen=True)
class ImageLayout:
    """Where images were found instead: ``root / prefix / <relative path without its first `drop` folders>``."""

    root: Path
    drop: int
    prefix: Tuple[str, ...]

    def locate(self, relative: PurePosixPath) -> Path:
        return self.root.joinpath(*self.prefix, *relative.parts[self.drop:])

    def template(self, template: str) -> Optional[str]:
        """``template`` (a relative path pattern) moved to this layout, or ``None`` when its first `drop` folders
        are not plain names (a format field there cannot be rewritten)."""
        parts = template.split("/")
        if self.drop >= len(parts) or any("{" in part for part in parts[:self.drop]):
            return None
        return "/".join([*self.prefix, *parts[self.drop:]])


def _layout_candidates(image_root: Path, relative: PurePosixPath) -> List[ImageLayout]:
    """Plausible other layouts for an image expected at ``image_root / relative``, nearest first: the same path
    under a parent or a child folder of ``image_root``, then other folder prefixes (see `COMMON_IMAGE_PREFIXES`)."""
    folders = len(relative.parts) - 1
    try:  # scandir: the entry type comes with the listing, no stat per entry (a folder of 80k images is quick)
        with os.scandir(image_root) as entries:
            children = sorted(Path(e.path) for e in entries if e.is_dir())[:50]
    except OSError:  # image_root missing or unreadable
        children = []
    # Parents as the caller wrote the root (relative stays relative), then above the current folder when needed.
    parents = list(image_root.parents) + ([] if image_root.is_absolute() else list(Path.cwd().parents))
    roots = [image_root, *parents[:3], *children]
    shapes = [(0, ())] + [(drop, ()) for drop in range(1, folders + 1)]
    shapes += [(folders - 1, prefix) for prefix in COMMON_IMAGE_PREFIXES if folders >= 1]
    seen, layouts = set(), []
    for drop, prefix in shapes:
        for root in roots:
            layout = ImageLayout(root, drop, prefix)
            if (root, drop, prefix) != (image_root, 0, ()) and layout.locate(relative) not in seen:
                seen.add(layout.locate(relative))
                layouts.append(layout)
    return layouts


def find_image_layout(image_root: Path, relatives: Sequence[PurePosixPath]) -> Optional[ImageLayout]:
    """A layout other than ``image_root / relative`` in which the first `LAYOUT_PROBES` of ``relatives`` (paths of
    images not found, relative to ``image_root``) all exist, or ``None``."""
    probes = [r for r in relatives[:LAYOUT_PROBES] if not r.is_absolute()]
    if not probes:
        return None
    for layout in _layout_candidates(image_root, probes[0]):
        if all(os.path.isfile(layout.locate(r)) for r in probes):
            return layout
    return None


def _found_elsewhere(layout: ImageLayout, first: Path, relative: PurePosixPath, template: Optional[str]) -> str:
    """What to pass (or link) so that a loader finds images that ``layout`` holds."""
    flag = " (--image-root)" if template else ""  # the refer loaders, which `mllmseg evaluate` builds, have a template
    if (layout.drop, layout.prefix) == (0, ()):
        return f"found them under {layout.root}: pass image_root {layout.root}{flag}"
    found = f"found them as {layout.locate(relative)}"
    moved = layout.template(template) if template else None
    if moved:
        return f"{found}: pass image_root {layout.root} (--image-root) and image_template {moved!r} (--image-template)"
    return f"{found}: link {layout.locate(relative).parent} in as {first.parent} (image_root / image path must name the file)"


def missing_images_message(source: str, missing: Sequence[Path], total: int, image_root: Path,
                           template: Optional[str] = None) -> str:
    """One line for image files not found: how many of how many, the image root, the layout expected (``template``:
    the loader's path pattern relative to ``image_root``, if it has one), the first few full paths, and, when all are
    missing and a common other layout nearby holds them, the options (or link) that would find them."""
    shown = ", ".join(str(p) for p in missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
    state = "" if image_root.is_dir() else " (no such folder)"
    expected = image_root / (template or "<image_path>")
    message = (f"{source}: {len(missing)} of {total} image files not found under image_root {image_root}{state}, "
               f"laid out as {expected}; missing: {shown}")
    if len(missing) < total:  # the layout is right for the others: these files are just not there
        return f"{message} (on_bad_record=skip / --skip-bad-records leaves their samples out)"
    try:
        relatives = [PurePosixPath(p.relative_to(image_root).as_posix()) for p in missing]
    except ValueError:  # absolute image paths: no other root can help
        relatives = []
    layout = find_image_layout(image_root, relatives)
    if layout is None:
        return f"{message}; no common other layout nearby holds them either"
    return f"{message}; {_found_elsewhere(layout, missing[0], relatives[0], template)}"


def image_size(info: dict) -> Tuple[int, int]:
    """``(height, width)`` of a COCO image record; `ValueError` naming the field when missing or not a positive
    integer (the message is meant to follow a "where" prefix)."""
    size = []
    for key in ("height", "width"):
        if key not in info:
            raise ValueError(f"missing {key!r}")
        value = info[key]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value) or value < 1):
            raise ValueError(f"{key!r} must be a positive integer, got {value!r}")
        size.append(int(value))
    return size[0], size[1]


def check_bbox(bbox: Any) -> None:
    """`ValueError` unless ``bbox`` is 4 finite numbers ``[x, y, w, h]`` with ``w, h >= 0``."""
    numbers = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    if not numbers or bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"'bbox' must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {bbox!r}")


@dataclass
class Referent:
    """One referring expression and its ground truth.

    Attributes:
        text: the expression.
        mask: bool ``[H, W]`` at the image's original size; all False when ``no_target``.
        box: xyxy box of the target (union box for several targets), ``None`` when ``no_target``.
        no_target: True when the expression refers to nothing in the image (GRES).
        ref_id: id of the ref (object description) the expression belongs to, when the source has one.
        sent_id: id of the sentence, when the source has one.
        category: the kind of expression, when the source knows it (the synthetic set: ``"attribute"``,
            ``"position"``, ``"size"``, ``"multi"``, ``"no_target"``); evaluation also reports metrics per category.
    """

    text: str
    mask: np.ndarray
    box: Optional[Box]
    no_target: bool = False
    ref_id: Any = None
    sent_id: Any = None
    category: Optional[str] = None


@dataclass
class ReferringSample:
    """One image and the expressions that refer into it.

    ``image`` is read on first access (through ``image_loader``) and converted to RGB, so that building a
    sample for its masks alone, e.g. for evaluation bookkeeping, never opens the image file. Loaders keep
    ``image_loader`` picklable (a module-level function or ``functools.partial``), so samples can cross
    ``DataLoader`` worker processes; pass ``collate_fn=list`` (or a model collator), since the default collate
    does not know this class.

    Attributes:
        image_id: id of the image in its source.
        height, width: original image size; every ``Referent.mask`` is ``[height, width]``.
        referents: the expressions, in source order.
        image_loader: zero-argument callable returning the image (any PIL mode); ``None`` when built with
            :meth:`from_image`.
        image_path: where the image comes from, when it is a file (for error messages and logs).
        split: the source split of the sample's expressions (``None`` when mixed or unknown).
    """

    image_id: Any
    height: int
    width: int
    referents: List[Referent]
    image_loader: Callable[[], Image.Image] = field(repr=False, compare=False, default=None)
    image_path: Optional[str] = None
    split: Optional[str] = None
    _image: Optional[Image.Image] = field(init=False, repr=False, compare=False, default=None)

    @property
    def image(self) -> Image.Image:
        """The RGB image, ``width x height`` (loaded once, then cached on the sample)."""
        if self._image is None:
            if self.image_loader is None:
                raise ValueError(f"sample {self.image_id!r} has no image loader")
            image = self.image_loader()
            self._image = to_rgb(image, f"image of sample {self.image_id!r}")
        return self._image

    @classmethod
    def from_image(cls, image_id: Any, image: Image.Image, referents: List[Referent], **kwargs) -> "ReferringSample":
        """Build a sample around an image already in memory."""
        sample = cls(image_id=image_id, height=image.height, width=image.width, referents=referents, **kwargs)
        # Held directly rather than behind a closure, so the sample pickles (DataLoader workers send samples).
        sample._image = to_rgb(image, f"image of sample {image_id!r}")
        return sample


def xywh_to_xyxy(box):
    """COCO ``[..., 4]`` ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` (float64 array)."""
    box = np.asarray(box, dtype=np.float64)
    return np.concatenate([box[..., :2], box[..., :2] + box[..., 2:]], axis=-1)


def as_bool_mask(mask) -> np.ndarray:
    """Bool view of a mask; non-bool inputs (probabilities or {0, 1}) are thresholded at > 0.5."""
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask > 0.5


def box_from_mask(mask) -> np.ndarray:
    """Tight box of a mask: ``[..., H, W]`` -> ``[..., 4]`` float ``[x0, y0, x1, y1]``.

    Coordinates are inclusive pixel indices: ``x0``/``x1`` are the min/max column index and ``y0``/``y1`` the
    min/max row index of the true pixels (a single pixel at row r, column c gives ``[c, r, c, r]``), as the reference
    evaluation boxes a predicted mask. An empty mask gives ``[0, 0, 0, 0]``. Non-bool masks are thresholded at > 0.5.
    """
    mask = as_bool_mask(mask)
    cols, rows = mask.any(axis=-2), mask.any(axis=-1)  # [..., W], [..., H]
    w, h = cols.shape[-1], rows.shape[-1]
    x0, x1 = cols.argmax(-1), w - 1 - cols[..., ::-1].argmax(-1)
    y0, y1 = rows.argmax(-1), h - 1 - rows[..., ::-1].argmax(-1)
    box = np.stack([x0, y0, x1, y1], axis=-1).astype(np.float64)
    return np.where(cols.any(-1)[..., None], box, 0.0)


def union_box(boxes: Sequence[Box]) -> Optional[Box]:
    """Smallest xyxy box containing all ``boxes`` (``None`` for no boxes)."""
    if len(boxes) == 0:
        return None
    arr = np.asarray(boxes, dtype=np.float64)
    return (float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max()))


def mask_to_box(mask: np.ndarray) -> Optional[Box]:
    """Ground-truth box of a bool ``[H, W]`` mask as a COCO-style continuous extent: `box_from_mask` plus one on the
    right and bottom (a pixel spans [c, c + 1]), like the xyxy of a COCO ``bbox``; ``None`` when empty."""
    if not np.asarray(mask).any():
        return None
    x0, y0, x1, y1 = (float(v) for v in box_from_mask(mask))
    return (x0, y0, x1 + 1, y1 + 1)
