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
:class:`~mllmseg.data.records.Referent` per sentence, as the ``refer`` loaders do. Every kept row is checked when the
adapter is built (JSON columns, image size, boxes, polygon / RLE geometry, sentences), so bad data fails before a
long run starts with a `BadRecordError` naming the dataset, the row and the field, and every image file
(``image_root / image_path``) is checked to exist (or, with ``on_bad_record="skip"``, the row is left out and listed in
``skipped``); masks are decoded (with the same rasterisation) only when a sample is accessed.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..remote_code.image_processing_mllmseg import ImageLoadError, load_image, to_rgb
from .masks import BadSegmentationError, decode_segmentation, validate_segmentation
from .records import (
    BadRecordError,
    Referent,
    ReferringSample,
    check_bbox,
    check_on_bad_record,
    image_size,
    missing_files,
    missing_images_message,
    sample_index,
    union_box,
    xywh_to_xyxy,
)

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
        on_bad_record: ``"error"`` (default): stop at the first bad row; ``"skip"``: leave bad rows out and list
            their messages in ``self.skipped``.
        source: how messages name the dataset (default: its cache file, or its name).
        check_images: check at construction that the image file of every kept row exists (one ``stat`` per image;
            not done for rows read from an ``image`` column); missing files count as bad records. ``False`` leaves
            that to ``sample.image``.

    Raises:
        ValueError: a required column is missing.
        BadRecordError: a malformed row (at construction; names the dataset, the row, its ref_id and the field).
        FileNotFoundError: image files are missing (at construction: how many, the first few paths, the image root
            and, when a common other layout holds them, where; with ``check_images=False``, when ``sample.image``
            is read).
    """

    def __init__(
        self,
        dataset,
        image_root: Optional[Union[str, Path]] = None,
        split: Optional[Union[str, Sequence[str]]] = None,
        text_key: str = "sent",
        on_bad_record: str = "error",
        source: Optional[str] = None,
        check_images: bool = True,
    ):
        self.on_bad_record = check_on_bad_record(on_bad_record)
        self.skipped: List[str] = []
        self.source = source or _dataset_name(dataset)
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
        self._by_image: Dict[Any, List[int]] = {}
        self._paths: Dict[Any, Path] = {}  # image_id -> image file (from its first kept row); none with an image column
        columns = [c for c in (*REQUIRED_COLUMNS, "ann_id", "bbox", "image_path") if c in self._rows.column_names]
        row = 0
        for batch in self._rows.select_columns(columns).iter(batch_size=1000):
            for values in zip(*(batch[c] for c in columns)):
                record = dict(zip(columns, values))
                if wanted is None or record["split"] in wanted:
                    try:
                        info = self._check_row(record, row)
                        if not self._has_image_column and record["image_id"] not in self._paths:
                            self._paths[record["image_id"]] = self._image_path(record, info, self._where(row, record))
                        self._by_image.setdefault(record["image_id"], []).append(row)
                    except BadRecordError as error:
                        self._bad_record(error)
                row += 1
        if check_images and not self._has_image_column:
            self._drop_missing_images()
        self.image_ids: List[Any] = list(self._by_image)

    def _bad_record(self, error: BadRecordError) -> None:
        """Stop (``on_bad_record="error"``) or note the record as skipped."""
        if self.on_bad_record == "error":
            raise error
        self.skipped.append(str(error))

    def _drop_missing_images(self) -> None:
        """Leave out the images whose file is missing: one message for all of them (``on_bad_record="error"``), or
        each of their rows noted as skipped (the first note carries the summary)."""
        missing = missing_files(self._paths.values())
        if not missing:
            return
        root = self.image_root if self.image_root is not None else Path(".")
        summary = missing_images_message(self.source, missing, len(self._paths), root)
        if self.on_bad_record == "error":
            raise FileNotFoundError(summary)
        missing_set = set(missing)
        for image_id, path in list(self._paths.items()):
            if path in missing_set:
                for row in self._by_image.pop(image_id):
                    self.skipped.append(f"{self.source}: row {row}: image file not found: {path}"
                                        + (f" ({summary})" if summary else ""))
                    summary = ""
                del self._paths[image_id]

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
        index = sample_index(index, len(self))
        image_id = self.image_ids[index]
        rows = self._by_image[image_id]
        records = [self._rows[r] for r in rows]
        # Rows were checked at construction: what follows cannot fail on their content.
        info = _parse_json(records[0], "raw_image_info", self._where(rows[0], records[0]))
        height, width = image_size(info)

        referents = []
        for row, record in zip(rows, records):
            mask, box, no_target = self._target(record, height, width, self._where(row, record))
            for sentence in record["sentences"]:
                referents.append(Referent(text=self._text(sentence), mask=mask.copy(), box=box, no_target=no_target,
                                          ref_id=record["ref_id"], sent_id=sentence.get("sent_id")))

        splits = {record["split"] for record in records}
        # functools.partial of module-level functions keeps samples picklable for DataLoader workers.
        if self._has_image_column:
            path, loader = None, partial(_image_from_row, self._images, rows[0], image_id)
        else:
            path = self._paths[image_id]
            loader = partial(_open_image, path, height, width)
        return ReferringSample(image_id=image_id, height=height, width=width, referents=referents,
                               image_loader=loader, image_path=None if path is None else str(path),
                               split=splits.pop() if len(splits) == 1 else None)

    def _image_path(self, record: dict, info: dict, where: str) -> Path:
        """The row's image file: ``image_root / image_path`` (``raw_image_info``'s ``file_name`` when ``image_path``
        is empty or absent)."""
        relative = record.get("image_path") or info.get("file_name")
        if not isinstance(relative, str) or not relative:
            raise BadRecordError(f"{where}: neither image_path nor raw_image_info.file_name names the image")
        return self.image_root / relative if self.image_root is not None else Path(relative)

    def _where(self, row: int, record: dict) -> str:
        return f"{self.source}: row {row} (ref_id {record.get('ref_id')})"

    def _text(self, sentence) -> str:
        """The expression of one ``sentences`` entry (``text_key``, else the other field); `ValueError` if none."""
        fallback = "raw" if self.text_key == "sent" else "sent"
        text = (sentence.get(self.text_key) or sentence.get(fallback)) if isinstance(sentence, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"sentence {sentence!r} has no {self.text_key!r} text")
        return text

    def _check_row(self, record: dict, row: int) -> dict:
        """The row's image record (``raw_image_info``), or `BadRecordError` naming the row and the field unless the
        row can become referents (nothing is rasterised: polygons and RLE are checked with `validate_segmentation`)."""
        where = self._where(row, record)
        try:
            info = _parse_json(record, "raw_image_info", where)
            height, width = image_size(info)
        except ValueError as e:
            raise BadRecordError(f"{where}: raw_image_info: {e}") from None
        self._annotations(record, height, width, where)
        sentences = record["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise BadRecordError(f"{where}: 'sentences' must be a non-empty list")
        for sentence in sentences:
            try:
                self._text(sentence)
            except ValueError as e:
                raise BadRecordError(f"{where}: sentences: {e}") from None
        return info

    def _annotations(self, record: dict, height: int, width: int, where: str) -> tuple:
        """The row's COCO annotations (validated) and its box: ``(anns, xyxy box or None)``; no annotation means
        no target."""
        anns = _parse_json(record, "raw_anns", where)
        anns = [anns] if isinstance(anns, dict) else anns
        if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise BadRecordError(f"{where}: raw_anns must hold a COCO annotation dict or a list of them")
        if not anns:
            return anns, None
        boxes = []
        for ann in anns:
            label = f"{where}: raw_anns: annotation {ann.get('id', record.get('ann_id'))}"
            if "segmentation" not in ann:
                raise BadRecordError(f"{label} has no 'segmentation'")
            try:
                validate_segmentation(ann["segmentation"], height, width)
            except BadSegmentationError as e:
                raise BadRecordError(f"{label}: 'segmentation': {e}") from None
            if "bbox" in ann:
                try:
                    check_bbox(ann["bbox"])
                except ValueError as e:
                    raise BadRecordError(f"{label}: {e}") from None
                boxes.append(tuple(float(v) for v in xywh_to_xyxy(ann["bbox"])))
        if len(boxes) == len(anns):
            return anns, union_box(boxes)
        column = record.get("bbox")
        try:
            check_bbox(column)  # the bbox column is already x1, y1, x2, y2: the same 4 finite numbers
        except ValueError:
            raise BadRecordError(f"{where}: no bbox in raw_anns, and the bbox column is {column!r}") from None
        return anns, tuple(float(v) for v in column)

    def _target(self, record: dict, height: int, width: int, where: str):
        """Union mask bool ``[H, W]``, union xyxy box and no-target flag of one row."""
        anns, box = self._annotations(record, height, width, where)
        mask = np.zeros((height, width), dtype=bool)
        for ann in anns:
            try:
                part = decode_segmentation(ann["segmentation"], height, width)
            except Exception as e:  # pycocotools raises TypeError / ValueError / IndexError on bad input
                raise BadRecordError(f"{where}: annotation {ann.get('id')}: bad segmentation: {e}") from e
            mask |= part
        return mask, box, not anns


def _dataset_name(dataset) -> str:
    """A name for messages: the dataset's first cache file, else its builder name."""
    files = getattr(dataset, "cache_files", None) or []
    if files and files[0].get("filename"):
        return str(files[0]["filename"])
    name = getattr(getattr(dataset, "info", None), "dataset_name", None)
    return f"dataset {name}" if name else "the dataset"


def _parse_json(record: dict, column: str, where: str):
    value = record[column]
    if isinstance(value, (dict, list)):  # already decoded by a copy that stores structs
        return value
    try:
        return json.loads(value)
    except (TypeError, ValueError) as e:
        raise BadRecordError(f"{where}: column {column!r} is not valid JSON: {e}") from None


def _open_image(path: Path, height: Optional[int] = None, width: Optional[int] = None) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    # The image processor's loader: decoded now (a truncated file fails here, naming it), converted to RGB, in the
    # stored frame (COCO annotations are drawn in it).
    image = load_image(path, exif_transpose=False)
    # Masks are rasterised at the recorded size; a different file would silently misalign them.
    if height is not None and image.size != (width, height):
        raise ValueError(f"image {path} is {image.size[0]}x{image.size[1]} but raw_image_info records {width}x{height}")
    return image


def _image_from_row(images, row: int, image_id: Any) -> Image.Image:
    """The ``image`` cell of ``row``: a decoded ``datasets.Image`` (PIL image) or an undecoded one (``{"bytes", "path"}``)."""
    cell = images[row][IMAGE_COLUMN]
    if isinstance(cell, Image.Image):
        return to_rgb(cell, f"image of row {row}")
    if isinstance(cell, dict):
        if cell.get("bytes"):
            try:
                return load_image(cell["bytes"], exif_transpose=False)  # decoded now: a cut file fails here
            except ImageLoadError as e:
                raise ImageLoadError(f"image_id {image_id}: image bytes of row {row}: {e}") from e
        if cell.get("path"):
            return _open_image(Path(cell["path"]))
    raise ValueError(f"image_id {image_id}: image column holds {type(cell).__name__}, not an image")
