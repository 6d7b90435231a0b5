"""Adapter for Hub copies of RefCOCO / RefCOCO+ / RefCOCOg in the ``jxu124/refcoco`` schema.

Schema assumed (from the ``dataset_info`` of the ``jxu124/refcoco`` dataset card; ``jxu124/refcocoplus`` and
``jxu124/refcocog`` share it). One row per ref::

    ref_id, ann_id, image_id, category_id: int
    split: str                      the refer split of the row ("train", "val", "testA", ...)
    sentences: [{raw, sent, sent_id, tokens}]
    sent_ids: [int]; file_name: str (ref-style, with the _<ann_id> suffix; unused)
    raw_anns: str                   JSON of the referred COCO annotation {id, image_id, segmentation, bbox
                                    [x, y, w, h], area, iscrowd, category_id}; a JSON list of such dicts is
                                    accepted too (several targets -> union; an empty list -> no target)
    raw_image_info: str             JSON of the COCO image record {id, file_name, height, width, ...}
    image_path: str                 image path relative to an image root, e.g. "coco/train2014/COCO_train2014_<id:012d>.jpg"
    bbox: [float]                   the target box, already x1, y1, x2, y2 (used only when raw_anns has no bbox)
    raw_sentences, captions, global_image_id, anns_id: unused

Row counts on the card match one row per RefCOCO (unc) ref: Hub splits train / validation / test / testB hold
42,404 / 3,811 / 1,975 / 1,810 rows, i.e. refer's train / val / testA / testB (the ``split`` column keeps the
refer name, which is what ``split=`` filters on). The card carries no documentation beyond the feature list, so the JSON contents of ``raw_anns`` and
``raw_image_info`` and the ``image_path`` form are the COCO / refer conventions reported by users of the
dataset. The Hub rows hold no pixels: images come from ``image_root / image_path`` (``raw_image_info``'s
``file_name`` when ``image_path`` is empty), or from an ``image`` column when a copy has one (a
``datasets.Image`` feature, PIL image or ``{"bytes", "path"}``).

Rows are grouped by image into :class:`~mllmseg.data.records.ReferringSample` s with one
:class:`~mllmseg.data.records.Referent` per sentence, as the ``refer`` loaders do; masks are decoded (with the
same rasterisation) only when a sample is accessed.
"""
from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..remote_code.image_processing_mllmseg import to_rgb
from .masks import decode_segmentation
from .records import Referent, ReferringSample, union_box, xywh_to_xyxy

REQUIRED_COLUMNS = ("ref_id", "image_id", "split", "sentences", "raw_anns", "raw_image_info")
IMAGE_COLUMN = "image"


class HubRefCOCODataset:
    """Referring-segmentation samples (one per image) from a ``datasets.Dataset`` in the ``jxu124/refcoco`` schema.

    Args:
        dataset: the ``datasets.Dataset`` (one split of the Hub dataset, or any concatenation).
        image_root: folder that the ``image_path`` column is relative to; ignored for rows read from an ``image``
            column. ``None``: ``image_path`` is used as it is.
        split: keep rows whose ``split`` column is this value (or one of these values); ``None`` keeps all.
        text_key: sentence field used as the expression, ``"sent"`` (default) or ``"raw"``.

    Raises:
        ValueError: a required column is missing (at construction) or a row is malformed (when its sample is
            built; the message names the ref_id and the problem).
        FileNotFoundError: an image file is missing (when ``sample.image`` is read; names the path).
    """

    def __init__(
        self,
        dataset,
        image_root: Optional[Union[str, Path]] = None,
        split: Optional[Union[str, Sequence[str]]] = None,
        text_key: str = "sent",
    ):
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"dataset lacks column(s) {missing} of the jxu124/refcoco schema "
                             f"(has {dataset.column_names})")
        self.image_root = Path(image_root) if image_root is not None else None
        self.text_key = text_key
        self.split = split
        self._has_image_column = IMAGE_COLUMN in dataset.column_names
        self._images = dataset.select_columns([IMAGE_COLUMN]) if self._has_image_column else None
        # Row metadata without the pixel column, so that building a sample never decodes an image.
        self._rows = dataset.remove_columns([IMAGE_COLUMN]) if self._has_image_column else dataset

        wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
        index = self._rows.select_columns(["image_id", "split"])
        self._by_image: Dict[Any, List[int]] = {}
        for row, (image_id, row_split) in enumerate(zip(index["image_id"], index["split"])):
            if wanted is None or row_split in wanted:
                self._by_image.setdefault(image_id, []).append(row)
        self.image_ids: List[Any] = list(self._by_image)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[ReferringSample]:
        for i in range(len(self)):
            yield self[i]

    @property
    def num_rows(self) -> int:
        """Number of refs (rows) kept."""
        return sum(len(rows) for rows in self._by_image.values())

    def __getitem__(self, index: int) -> ReferringSample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image_id = self.image_ids[index]
        rows = self._by_image[image_id]
        records = [self._rows[r] for r in rows]

        info = _parse_json(records[0], "raw_image_info")
        try:
            height, width = int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"ref_id {records[0]['ref_id']}: raw_image_info has no usable height/width") from e

        referents = []
        for record in records:
            mask, box, no_target = self._target(record, height, width)
            for sentence in record["sentences"]:
                text = sentence.get(self.text_key) or sentence.get("raw" if self.text_key == "sent" else "sent")
                if not isinstance(text, str):
                    raise ValueError(f"ref_id {record['ref_id']}: sentence {sentence!r} has no text")
                referents.append(Referent(text=text, mask=mask.copy(), box=box, no_target=no_target,
                                          ref_id=record["ref_id"], sent_id=sentence.get("sent_id")))

        splits = {record["split"] for record in records}
        # functools.partial of module-level functions keeps samples picklable for DataLoader workers.
        if self._has_image_column:
            path, loader = None, partial(_image_from_row, self._images, rows[0], image_id)
        else:
            path = self._image_path(records[0], info)
            loader = partial(_open_image, path, height, width)
        return ReferringSample(image_id=image_id, height=height, width=width, referents=referents,
                               image_loader=loader, image_path=None if path is None else str(path),
                               split=splits.pop() if len(splits) == 1 else None)

    def _image_path(self, record: dict, info: dict) -> Path:
        relative = record.get("image_path") or info.get("file_name")
        if not relative:
            raise ValueError(f"ref_id {record['ref_id']}: neither image_path nor raw_image_info.file_name names the image")
        return self.image_root / relative if self.image_root is not None else Path(relative)

    def _target(self, record: dict, height: int, width: int):
        """Union mask bool ``[H, W]``, union xyxy box and no-target flag of one row."""
        ref_id = record["ref_id"]
        anns = _parse_json(record, "raw_anns")
        anns = [anns] if isinstance(anns, dict) else anns
        if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise ValueError(f"ref_id {ref_id}: raw_anns must hold a COCO annotation dict or a list of them")
        mask = np.zeros((height, width), dtype=bool)
        if not anns:
            return mask, None, True
        boxes = []
        for ann in anns:
            ann_id = ann.get("id", record.get("ann_id"))
            if "segmentation" not in ann:
                raise ValueError(f"ref_id {ref_id}: annotation {ann_id} in raw_anns has no 'segmentation'")
            try:
                part = decode_segmentation(ann["segmentation"], height, width)
            except Exception as e:  # pycocotools raises TypeError / ValueError / IndexError on bad input
                raise ValueError(f"ref_id {ref_id}: annotation {ann_id}: bad segmentation: {e}") from e
            if part.shape != (height, width):
                raise ValueError(f"ref_id {ref_id}: annotation {ann_id}: segmentation decodes to {part.shape}, "
                                 f"image is {(height, width)}")
            mask |= part
            if "bbox" in ann:
                boxes.append(tuple(float(v) for v in xywh_to_xyxy(ann["bbox"])))
        if len(boxes) == len(anns):
            box = union_box(boxes)
        elif record.get("bbox") is not None and len(record["bbox"]) == 4:
            box = tuple(float(v) for v in record["bbox"])  # this column is already x1, y1, x2, y2
        else:
            raise ValueError(f"ref_id {ref_id}: no bbox in raw_anns nor in the bbox column")
        return mask, box, False


def _parse_json(record: dict, column: str):
    value = record[column]
    if isinstance(value, (dict, list)):  # already decoded by a copy that stores structs
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"ref_id {record.get('ref_id')}: column {column!r} is not valid JSON: {e}") from e


def _open_image(path: Path, height: Optional[int] = None, width: Optional[int] = None) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    image = Image.open(path)
    # Masks are rasterised at the recorded size; a different file would silently misalign them.
    if height is not None and image.size != (width, height):
        raise ValueError(f"image {path} is {image.size[0]}x{image.size[1]} but raw_image_info records {width}x{height}")
    return to_rgb(image, str(path))  # the image processor's conversion (alpha on white, 16-bit scaling)


def _image_from_row(images, row: int, image_id: Any) -> Image.Image:
    """The ``image`` cell of ``row``: a decoded ``datasets.Image`` (PIL image) or an undecoded one (``{"bytes", "path"}``)."""
    cell = images[row][IMAGE_COLUMN]
    if isinstance(cell, Image.Image):
        return to_rgb(cell, f"image of row {row}")
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return to_rgb(Image.open(io.BytesIO(cell["bytes"])), f"image bytes of row {row}")
        if cell.get("path"):
            return _open_image(Path(cell["path"]))
    raise ValueError(f"image_id {image_id}: image column holds {type(cell).__name__}, not an image")
