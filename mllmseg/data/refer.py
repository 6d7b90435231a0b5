"""Loaders for referring-expression data in the ``refer`` layout (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF, gRefCOCO).

Layout (the one of the ``refer`` toolkit)::

    <data_root>/<dataset>/refs(<split_by>).p        pickled list of refs (a .json with the same list is accepted)
    <data_root>/<dataset>/instances.json            COCO: images, annotations (bbox [x, y, w, h], polygons or RLE)
    <data_root>/grefcoco/grefs(unc).json            gRefCOCO: ann_id / category_id are lists, no-target = [-1]
    <image_root>/images/mscoco/images/train2014/COCO_train2014_<image_id:012d>.jpg    (image_root: default data_root)
    <image_root>/images/saiapr_tc-12/<file_name of instances.json>                   RefCLEF

``image_template`` changes the image path under ``image_root`` (e.g. ``train2014/COCO_train2014_{image_id:012d}.jpg``
for a plain COCO download).

A ref is ``{ref_id, ann_id, image_id, category_id, split, sentences: [{raw, sent, tokens, sent_id}]}``.
The image path is built from ``image_id``: the ref's ``file_name`` carries an ``_<ann_id>`` suffix and names
no real file.

Samples are grouped by image: one :class:`~mllmseg.data.records.ReferringSample` per image with one
:class:`~mllmseg.data.records.Referent` per sentence (the evaluation unit). Indexing, ids and splits are
read at construction, and every record used is validated then (missing keys, unknown ``ann_id`` / ``image_id``,
image sizes, boxes, polygon / RLE geometry), so bad data fails before a long run starts, with a `BadRecordError`
naming the file, the record and the field; every image file the kept refs use is checked to exist (one ``stat`` each),
and missing ones fail with one `FileNotFoundError` that counts them, names the first few, the layout expected and, when
a common other layout (e.g. a plain ``<root>/train2014/``) holds them, the ``image_root`` / ``image_template`` to pass.
With ``on_bad_record="skip"`` bad records (and refs whose image is missing) are left out instead and listed in
``dataset.skipped``. Masks are decoded only when a sample is accessed and the image is read only when ``sample.image``
is.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..remote_code.image_processing_mllmseg import load_image
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

# splitBy values published for each dataset; the first is the default.
SPLIT_BY = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
    "grefcoco": ("unc",),
}

COCO_IMAGE_TEMPLATE = "images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg"
# RefCLEF images are named in instances.json (the refer toolkit joins them to images/saiapr_tc-12).
REFCLEF_IMAGE_TEMPLATE = "images/saiapr_tc-12/{file_name}"

_REQUIRED_REF_KEYS = ("ref_id", "image_id", "split", "ann_id", "sentences")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class ReferRecord:
    """One validated ref: what a sample needs, ids already checked against ``instances.json``.

    ``ann_ids`` is empty exactly when ``no_target``; ``sentences`` holds ``(text, sent_id)`` pairs.
    """

    ref_id: Any
    image_id: Any
    split: str
    ann_ids: Tuple[Any, ...]
    no_target: bool
    sentences: Tuple[Tuple[str, Any], ...]


class _RefsUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that refuses to import anything: refs files hold only lists, dicts, str and numbers.

    A refs ``.p`` comes from the internet; a plain ``pickle.load`` would run whatever callable it names.
    """

    # "__builtin__" is how Python 2 pickles (the original UNC release) name the same types.
    _ALLOWED = {(module, name) for module in ("builtins", "__builtin__")
                for name in ("set", "frozenset", "list", "dict", "tuple", "str", "int", "float")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refs pickle asks for {module}.{name}; only plain containers are allowed")


def check_image_template(template: str) -> str:
    """``template`` if it formats with ``image_id`` (an int) and ``file_name`` alone, else a `ValueError` naming it."""
    try:
        template.format(image_id=0, file_name="x.jpg")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"image_template {template!r} does not format with {{image_id}} and {{file_name}}: "
                         f"{type(e).__name__}: {e}") from None
    return template


def read_json_file(path: Path):
    """A JSON file's content; a syntax error names the file, line and column."""
    with open(path, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text: {e}") from None


def _load_refs_file(path: Path) -> list:
    if path.suffix == ".json":
        refs = read_json_file(path)
    else:
        with open(path, "rb") as f:
            try:
                try:
                    refs = _RefsUnpickler(f).load()
                except UnicodeDecodeError:
                    # Python 2 pickles of non-ASCII byte strings need latin1 to load in Python 3.
                    f.seek(0)
                    refs = _RefsUnpickler(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError) as e:
                raise ValueError(f"{path}: cannot read refs pickle: {e}") from e
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _ref_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and "ref_id" in raw:
        return f"ref_id {raw['ref_id']}"
    return f"ref at position {index} (no ref_id)"


class ReferDataset:
    """Referring-segmentation samples (one per image) read from the ``refer`` layout.

    Args:
        data_root: folder holding ``<dataset>/refs(<split_by>).p`` and ``<dataset>/instances.json``.
        dataset: ``"refcoco"``, ``"refcoco+"``, ``"refcocog"``, ``"refclef"``, ``"grefcoco"`` or the name of any
            folder in the same layout.
        split_by: annotation partition (``unc``, ``umd``, ``google``, ``berkeley``); default from ``SPLIT_BY``.
        split: keep refs of this split (e.g. ``"val"``, ``"testA"``) or of these splits; ``None`` keeps all.
        image_root: folder the image template is relative to (default ``data_root``).
        image_template: relative image path, formatted with ``image_id`` and ``file_name`` (the file name recorded
            in ``instances.json``); default COCO train2014 naming, or ``images/saiapr_tc-12/{file_name}`` for RefCLEF.
        text_key: sentence field used as the expression (``"sent"``: lower-cased and tokenised, as the
            reference evaluates; ``"raw"``: original text). Falls back to the other one when absent.
        on_bad_record: ``"error"`` (default): stop at the first bad record; ``"skip"``: leave bad records out (a bad
            image or annotation takes the refs that use it along) and list their messages in ``self.skipped``.
            Image files that are missing count as bad records.
        check_images: check at construction that the image file of every kept ref exists (one ``stat`` per image);
            ``False`` leaves that to ``sample.image`` (for reading annotations without the images).

    Raises:
        FileNotFoundError: a folder or file is missing (the message names the full path); for image files, how many
            are missing, the first few paths, the layout expected and, when a common other layout holds them, the
            ``image_root`` / ``image_template`` to pass.
        ValueError: an unreadable file (names it, and the line and column of a JSON syntax error).
        BadRecordError: a malformed record (names the file, its position or ref_id / ann_id / image_id, the field
            and the problem).
    """

    def __init__(
        self,
        data_root: PathLike,
        dataset: str = "refcoco",
        split_by: Optional[str] = None,
        split: Optional[Union[str, Sequence[str]]] = None,
        image_root: Optional[PathLike] = None,
        image_template: Optional[str] = None,
        text_key: str = "sent",
        on_bad_record: str = "error",
        check_images: bool = True,
    ):
        self.on_bad_record = check_on_bad_record(on_bad_record)
        self.skipped: List[str] = []
        if split_by is None:
            if dataset not in SPLIT_BY:
                raise ValueError(f"unknown dataset {dataset!r}: pass split_by (known: {sorted(SPLIT_BY)})")
            split_by = SPLIT_BY[dataset][0]
        self.dataset = dataset
        self.split_by = split_by
        self.split = split
        self.data_root = Path(data_root)
        self.image_root = Path(image_root) if image_root is not None else self.data_root
        if image_template is None:
            image_template = REFCLEF_IMAGE_TEMPLATE if dataset == "refclef" else COCO_IMAGE_TEMPLATE
        self.image_template = check_image_template(image_template)
        self.text_key = text_key

        folder = self.data_root / dataset
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {folder}")
        self.refs_path = self._find_refs_file(folder)
        self.instances_path = folder / "instances.json"
        if not self.instances_path.is_file():
            raise FileNotFoundError(f"instances file not found: {self.instances_path}")

        instances = read_json_file(self.instances_path)
        if not isinstance(instances, dict):
            raise ValueError(f"{self.instances_path}: expected a JSON object, got {type(instances).__name__}")
        for key in ("images", "annotations"):
            if not isinstance(instances.get(key), list):
                raise ValueError(f"{self.instances_path}: missing top-level list {key!r}")
        self._images: Dict[Any, dict] = self._index(instances["images"], "image")
        self._anns: Dict[Any, dict] = self._index(instances["annotations"], "annotation")

        wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
        self.records: List[ReferRecord] = []
        for index, raw in enumerate(_load_refs_file(self.refs_path)):
            try:
                if not isinstance(raw, dict):
                    raise BadRecordError(f"{self.refs_path}: ref at position {index} is a {type(raw).__name__}, "
                                         "not a dict")
                if "split" not in raw:
                    raise BadRecordError(f"{self.refs_path}: {_ref_label(raw, index)}: missing key 'split'")
                if wanted is not None and raw["split"] not in wanted:
                    continue
                self.records.append(self._validate(raw, index))
            except BadRecordError as error:
                self._bad_record(error)
        if check_images:
            self.records = self._drop_missing_images(self.records)

        # Group by image, keeping first-appearance order so that indices are stable across runs.
        self._by_image: Dict[Any, List[ReferRecord]] = {}
        for record in self.records:
            self._by_image.setdefault(record.image_id, []).append(record)
        self.image_ids: List[Any] = list(self._by_image)

    # ------------------------------------------------------------------ construction helpers

    def _bad_record(self, error: BadRecordError) -> None:
        """Stop (``on_bad_record="error"``) or note the record as skipped."""
        if self.on_bad_record == "error":
            raise error
        self.skipped.append(str(error))

    def _drop_missing_images(self, records: List[ReferRecord]) -> List[ReferRecord]:
        """``records`` whose image file exists. Missing ones stop construction with one message for all of them
        (``on_bad_record="error"``) or leave their refs out, each noted as skipped (the first note carries the
        summary)."""
        paths = {}
        for record in records:
            if record.image_id not in paths:
                paths[record.image_id] = self.image_path(record.image_id)
        missing = missing_files(paths.values())
        if not missing:
            return records
        summary = self._missing_images_message(missing, len(paths))
        if self.on_bad_record == "error":
            raise FileNotFoundError(summary)
        missing, kept = set(missing), []
        for record in records:
            path = paths[record.image_id]
            if path in missing:
                self.skipped.append(f"{self.refs_path}: ref_id {record.ref_id}: image file not found: {path}"
                                    + (f" ({summary})" if summary else ""))
                summary = ""
            else:
                kept.append(record)
        return kept

    def _missing_images_message(self, missing: List[Path], total: int) -> str:
        source = f"{self.dataset} {self.refs_path.name} split {self.split or '(all)'}"
        return missing_images_message(source, missing, total, self.image_root, self.image_template)

    def _index(self, records: list, kind: str) -> Dict[Any, dict]:
        """id -> record for instances.json's images / annotations; a record without an id is a bad record."""
        index = {}
        for position, record in enumerate(records):
            try:
                if not isinstance(record, dict):
                    raise BadRecordError(f"{self.instances_path}: {kind} at position {position} is a "
                                         f"{type(record).__name__}, not a dict")
                if "id" not in record:
                    owner = f" (image_id {record['image_id']})" if "image_id" in record else ""
                    raise BadRecordError(f"{self.instances_path}: {kind} at position {position}{owner} has no 'id'")
            except BadRecordError as error:
                self._bad_record(error)
                continue
            index[record["id"]] = record
        return index

    def _find_refs_file(self, folder: Path) -> Path:
        prefix = "grefs" if self.dataset == "grefcoco" else "refs"
        stem = f"{prefix}({self.split_by})"
        # gRefCOCO ships JSON, the others pickles; accept either for both.
        suffixes = (".json", ".p") if prefix == "grefs" else (".p", ".json")
        candidates = [folder / (stem + s) for s in suffixes]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"refs file not found: {candidates[0]} (also tried {candidates[1]})")

    def _validate(self, raw: dict, index: int) -> ReferRecord:
        where = f"{self.refs_path}: {_ref_label(raw, index)}"
        missing = [k for k in _REQUIRED_REF_KEYS if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        ref_id, image_id = raw["ref_id"], raw["image_id"]
        if image_id not in self._images:
            raise BadRecordError(f"{where}: image_id {image_id} not in {self.instances_path}")
        try:
            height, width = image_size(self._images[image_id])
        except ValueError as e:
            raise BadRecordError(f"{where}: image_id {image_id} in {self.instances_path}: {e}") from None

        # RES refs carry one ann_id, gRefCOCO refs a list; [-1] (with no_target true) marks "no such object".
        ann_field = raw["ann_id"]
        ann_ids = list(ann_field) if isinstance(ann_field, (list, tuple)) else [ann_field]
        real_ids = [a for a in ann_ids if a != -1]
        no_target = bool(raw.get("no_target", False)) or (len(ann_ids) > 0 and not real_ids)
        if no_target and real_ids:
            raise BadRecordError(f"{where}: no_target is true but ann_id lists annotations {real_ids}")
        if not no_target and not real_ids:
            raise BadRecordError(f"{where}: ann_id is empty")
        for ann_id in real_ids:
            ann = self._anns.get(ann_id)
            if ann is None:
                raise BadRecordError(f"{where}: ann_id {ann_id} not in {self.instances_path}")
            self._check_annotation(ann, image_id, height, width, f"{where}: ann_id {ann_id} in {self.instances_path}")

        sentences = raw["sentences"]
        if not isinstance(sentences, (list, tuple)) or len(sentences) == 0:
            raise BadRecordError(f"{where}: 'sentences' must be a non-empty list")
        parsed = []
        fallback = "raw" if self.text_key == "sent" else "sent"
        for sentence in sentences:
            text = sentence.get(self.text_key, sentence.get(fallback)) if isinstance(sentence, dict) else None
            if not isinstance(text, str):
                raise BadRecordError(f"{where}: sentence {sentence!r} has no {self.text_key!r} text")
            parsed.append((text, sentence.get("sent_id")))
        return ReferRecord(ref_id=ref_id, image_id=image_id, split=raw["split"], ann_ids=tuple(real_ids),
                           no_target=no_target, sentences=tuple(parsed))

    @staticmethod
    def _check_annotation(ann: dict, image_id: Any, height: int, width: int, where: str) -> None:
        """`BadRecordError` (prefixed with ``where``) unless the annotation belongs to the image and its box and
        segmentation can be used: checked without rasterising (`validate_segmentation`)."""
        if ann.get("image_id") != image_id:
            raise BadRecordError(f"{where}: belongs to image {ann.get('image_id')}, not {image_id}")
        for key in ("segmentation", "bbox"):
            if key not in ann:
                raise BadRecordError(f"{where}: has no {key!r}")
        try:
            check_bbox(ann["bbox"])
        except ValueError as e:
            raise BadRecordError(f"{where}: {e}") from None
        try:
            validate_segmentation(ann["segmentation"], height, width)
        except BadSegmentationError as e:
            raise BadRecordError(f"{where}: 'segmentation': {e}") from None

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[ReferringSample]:
        for i in range(len(self)):
            yield self[i]

    @property
    def num_referents(self) -> int:
        """Number of expressions (sentences) over all samples."""
        return sum(len(r.sentences) for r in self.records)

    def image_path(self, image_id: Any) -> Path:
        """Where the image of ``image_id`` is expected (built from the id, never from a ref's file_name)."""
        info = self._images[image_id]
        return self.image_root / self.image_template.format(image_id=image_id, file_name=info.get("file_name", ""))

    def __getitem__(self, index: int) -> ReferringSample:
        index = sample_index(index, len(self))
        image_id = self.image_ids[index]
        height, width = image_size(self._images[image_id])  # checked at construction

        referents = []
        for record in self._by_image[image_id]:
            mask, box = self._target(record, height, width)
            for text, sent_id in record.sentences:
                # Each referent owns its mask so that in-place edits by a transform never leak to siblings.
                referents.append(Referent(text=text, mask=mask.copy(), box=box, no_target=record.no_target,
                                          ref_id=record.ref_id, sent_id=sent_id))
        splits = {r.split for r in self._by_image[image_id]}
        path = self.image_path(image_id)
        return ReferringSample(image_id=image_id, height=height, width=width, referents=referents,
                               image_loader=partial(_open_image, path, height, width), image_path=str(path),
                               split=splits.pop() if len(splits) == 1 else None)

    def _target(self, record: ReferRecord, height: int, width: int):
        """Union mask bool ``[H, W]`` and union xyxy box of a record's annotations (empty / None for no-target)."""
        mask = np.zeros((height, width), dtype=bool)
        boxes = []
        for ann_id in record.ann_ids:
            ann = self._anns[ann_id]
            where = f"{self.instances_path}: ann_id {ann_id} (ref_id {record.ref_id})"
            try:
                part = decode_segmentation(ann["segmentation"], height, width)
            except Exception as e:  # pycocotools raises TypeError / ValueError / IndexError on bad input
                raise BadRecordError(f"{where}: bad segmentation: {e}") from e
            if part.shape != (height, width):
                raise BadRecordError(f"{where}: bad segmentation: decoded to {part.shape}, image is {(height, width)}")
            mask |= part
            boxes.append(tuple(float(v) for v in xywh_to_xyxy(ann["bbox"])))
        return mask, union_box(boxes)


class GRefCOCODataset(ReferDataset):
    """gRefCOCO (``<data_root>/grefcoco/grefs(unc).json``): multi-target refs get the union mask, no-target refs an
    empty one with ``no_target=True`` and ``box=None``. Same arguments as :class:`ReferDataset`."""

    def __init__(self, data_root: PathLike, split: Optional[Union[str, Sequence[str]]] = None,
                 split_by: str = "unc", **kwargs):
        super().__init__(data_root, dataset="grefcoco", split_by=split_by, split=split, **kwargs)


def _open_image(path: Path, height: int, width: int) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    # The image processor's loader: decoded now (a truncated file fails here, naming it), RGB as it converts (alpha
    # on white, 16-bit scaling), in the stored frame, in which COCO-style annotations are drawn.
    image = load_image(path, exif_transpose=False)
    # Masks are rasterised at the recorded size; a different file would silently misalign them.
    if image.size != (width, height):
        raise ValueError(f"image {path} is {image.size[0]}x{image.size[1]} but instances.json records {width}x{height}")
    return image
