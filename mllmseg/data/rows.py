"""Your own data: rows of image + expression + mask, from a ``datasets.Dataset``, a JSONL file or a folder.

Each row names one image, one expression (or a list of expressions for the same target) and its mask:

* ``image``: a path (relative to the JSONL file's folder, or to ``image_root``), a PIL image, or a
  ``datasets.Image`` cell (decoded, or ``{"bytes", "path"}``).
* ``expression``: a non-empty string, or a list of them.
* ``mask``: a mask image path (PNG; any non-zero pixel is the target), a ``[H, W]`` array or PIL image, a COCO RLE
  (``{"size": [H, W], "counts": ...}``), COCO polygons (``[[x1, y1, x2, y2, ...], ...]``), or ``null`` / ``None`` for
  an expression that refers to nothing in the image (a GRES no-target, answered with ``[REJ]``).

A folder holds a ``metadata.jsonl`` whose image column is ``file_name``: the layout of ``datasets``' ``imagefolder``
builder, so the same folder also loads with ``datasets.load_dataset("imagefolder", data_dir=...)``. ``columns`` maps
other column names (``{"expression": "sentence", "mask": "segmentation"}``). Rows of the same image (same path, or
the same value of an ``image_id`` column) become one sample with one referent per expression, as the refer loaders
build them.

Masks are in the image's stored frame (the one the COCO-style loaders use); a mask whose size matches the image only
after the EXIF rotation is refused with a message saying so rather than being trained on misaligned. Every problem
names the file, the row and the column.
"""
from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from ..remote_code.image_processing_mllmseg import to_rgb
from .masks import BadSegmentationError, decode_segmentation
from .records import BadRecordError, Referent, ReferringSample, mask_to_box, sample_index

COLUMNS = ("image", "expression", "mask", "image_id")
METADATA_FILE = "metadata.jsonl"


class BadRowError(BadRecordError):
    """A row that cannot become a training / evaluation sample (the message names the source, row and column)."""


def read_jsonl(path: Union[str, Path]) -> List[dict]:
    """The records of a JSON Lines file (blank lines skipped); a bad line names the file and the line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rows file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BadRowError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise BadRowError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            rows.append(record)
    if not rows:
        raise BadRowError(f"{path}: no rows")
    return rows


class ReferringRowsDataset:
    """Referring-segmentation samples (one per image) from rows of image + expression + mask.

    Args:
        source: a ``datasets.Dataset``, a list of dicts, a ``.jsonl`` file, or a folder with ``metadata.jsonl``.
        columns: source column name for each of ``image``, ``expression``, ``mask`` and ``image_id`` (optional), where
            they differ (defaults: ``image`` (``file_name`` in a folder), ``expression``, ``mask``, ``image_id``).
        image_root: folder that relative image and mask paths are read from (default: the JSONL file's folder; the
            current folder for a ``datasets.Dataset``).
        split: recorded on the samples.

    Raises:
        BadRowError: a column is missing (at construction), or a row is malformed (when its sample is built).
        FileNotFoundError: an image or mask file is missing (names the path and the row).
    """

    def __init__(self, source, columns: Optional[Mapping[str, str]] = None, image_root: Optional[Union[str, Path]] = None,
                 split: Optional[str] = None):
        columns = dict(columns or {})
        unknown = sorted(set(columns) - set(COLUMNS))
        if unknown:
            raise BadRowError(f"columns: unknown key(s) {unknown}; map any of {list(COLUMNS)} to your column names")
        self.split = split
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                columns.setdefault("image", "file_name")
                path = path / METADATA_FILE
            self.name = str(path)
            self._rows = read_jsonl(path)
            self.root = Path(image_root) if image_root is not None else path.parent
        else:
            self.name = "dataset" if hasattr(source, "column_names") else "rows"
            self._rows = source
            self.root = Path(image_root) if image_root is not None else None
        self.columns = {key: columns.get(key, key) for key in COLUMNS}
        names = set(source.column_names) if hasattr(source, "column_names") else set().union(*map(set, self._rows))
        missing = [self.columns[key] for key in ("image", "expression", "mask") if self.columns[key] not in names]
        if missing:
            raise BadRowError(f"{self.name}: no column(s) {missing} (has {sorted(names)}); map yours with columns=")
        # Group rows by image without decoding any image: the image_id column, else the path, else the row.
        image_col, id_col = self.columns["image"], self.columns["image_id"]
        keys = self._column(id_col) if id_col in names else None
        paths = self._column(image_col) if keys is None else None
        self._by_image: Dict[Any, List[int]] = {}
        for row in range(len(self._rows)):
            if keys is not None:
                key = keys[row]
            else:
                cell = paths[row]
                key = cell if isinstance(cell, str) else cell.get("path") if isinstance(cell, dict) and cell.get("path") else row
            self._by_image.setdefault(key, []).append(row)
        self.image_ids = list(self._by_image)

    def _column(self, name: str) -> list:
        if hasattr(self._rows, "column_names"):  # a datasets.Dataset: one column, images left undecoded
            column = self._rows.select_columns([name])
            if name in column.features and hasattr(column.features[name], "decode"):
                column = column.cast_column(name, type(column.features[name])(decode=False))
            return column[name]
        return [record.get(name) for record in self._rows]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _where(self, row: int, column: str) -> str:
        return f"{self.name} row {row} column {column!r}"

    def __getitem__(self, index: int) -> ReferringSample:
        index = sample_index(index, len(self))
        image_id = self.image_ids[index]
        rows = self._by_image[image_id]
        records = [self._rows[r] for r in rows]
        image_col = self.columns["image"]
        image, path = self._open_image(records[0].get(image_col), rows[0])
        width, height = image.size
        referents = []
        for row, record in zip(rows, records):
            mask = self._mask(record.get(self.columns["mask"]), row, height, width, image)
            for text in self._expressions(record.get(self.columns["expression"]), row):
                no_target = mask is None
                target = np.zeros((height, width), dtype=bool) if no_target else mask
                referents.append(Referent(text=text, mask=target.copy(), box=None if no_target else mask_to_box(mask),
                                          no_target=no_target, ref_id=row))
        if path is not None:
            loader = partial(_open_file, path, f"{self._where(rows[0], image_col)}")
            return ReferringSample(image_id=image_id, height=height, width=width, referents=referents,
                                   image_loader=loader, image_path=str(path), split=self.split)
        return ReferringSample.from_image(image_id, image, referents, split=self.split)

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.root is None else self.root / path

    def _open_image(self, cell, row: int):
        """(image, path or None): the header only for a file (the pixels load with the sample's image)."""
        where = self._where(row, self.columns["image"])
        if isinstance(cell, Image.Image):
            return cell, None
        if isinstance(cell, dict) and cell.get("bytes"):
            return _open(io.BytesIO(cell["bytes"]), where), None
        if isinstance(cell, dict) and cell.get("path"):
            cell = cell["path"]
        if isinstance(cell, (str, Path)) and str(cell):
            path = self._path(str(cell))
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image file not found: {path}")
            return _open(path, where), path
        raise BadRowError(f"{where}: expected an image path, a PIL image or a datasets.Image cell, got "
                          f"{type(cell).__name__} ({cell!r:.60})")

    def _expressions(self, value, row: int) -> List[str]:
        where = self._where(row, self.columns["expression"])
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)) or not texts:
            raise BadRowError(f"{where}: expected a string or a non-empty list of strings, got {value!r:.60}")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise BadRowError(f"{where}: expected a non-empty string, got {text!r:.60}")
        return [text.strip() for text in texts]

    def _mask(self, value, row: int, height: int, width: int, image: Image.Image) -> Optional[np.ndarray]:
        """bool ``[H, W]``, or None for a no-target row (``null``)."""
        where = self._where(row, self.columns["mask"])
        if value is None:
            return None
        if isinstance(value, (list, dict)) and not (isinstance(value, dict) and ("bytes" in value or "path" in value)):
            try:
                return decode_segmentation(value, height, width)
            except BadSegmentationError as error:
                raise BadRowError(f"{where}: {error}") from None
        if isinstance(value, dict):  # a datasets.Image cell
            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value["path"]
        if isinstance(value, (str, Path)):
            path = self._path(str(value))
            if not path.is_file():
                raise FileNotFoundError(f"{where}: mask file not found: {path}")
            value = Image.open(path)
        mask = np.asarray(value)
        if mask.ndim == 3:  # an RGB(A) mask picture: any non-zero channel
            mask = mask.any(axis=-1)
        if mask.ndim != 2:
            raise BadRowError(f"{where}: a mask must be 2-D [H, W], got shape {mask.shape}")
        if mask.dtype.kind == "f" and not np.isfinite(mask).all():
            raise BadRowError(f"{where}: the mask has NaN or inf values")
        if mask.shape != (height, width):
            rotated = ImageOps.exif_transpose(image).size[::-1] if image.getexif().get(0x0112, 1) != 1 else None
            hint = (" (it matches the EXIF-rotated image: masks are in the stored frame, as COCO annotations are)"
                    if rotated == mask.shape else "")
            raise BadRowError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}{hint}")
        return mask.astype(bool) if mask.dtype == bool else mask > 0


def _open(file, where: str) -> Image.Image:
    try:
        return Image.open(file)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadRowError(f"{where}: not a readable image ({error})") from None


def _open_file(path: Path, where: str) -> Image.Image:
    return to_rgb(_open(path, where), str(path))


def write_rows_folder(samples, folder: Union[str, Path], progress: bool = False) -> Path:
    """Write ``samples`` (any sequence of :class:`ReferringSample`) as a rows folder this module reads back:
    ``images/NNNNNN.png``, one ``masks/NNNNNN_K.png`` per targeted expression and ``metadata.jsonl`` (``file_name``,
    ``expression``, ``mask`` (null for no target), ``image_id``). The folder is written beside its final place and
    renamed into it, so an interrupted write leaves no half folder; an existing ``folder`` is refused.

    Categories are not stored (the format has no column for them). Returns the folder."""
    from ..atomic import staged_folder

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"rows folder {folder} already exists; remove it or choose another")
    with staged_folder(folder) as staging:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        items = samples
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(samples, desc=f"writing {folder.name}", unit="image")
        with (staging / METADATA_FILE).open("w", encoding="utf-8") as meta:
            for i, sample in enumerate(items):
                name = f"images/{i:06d}.png"
                sample.image.save(staging / name)
                for k, referent in enumerate(sample.referents):
                    mask_name = None
                    if not referent.no_target:
                        mask_name = f"masks/{i:06d}_{k}.png"
                        Image.fromarray(np.asarray(referent.mask, dtype=np.uint8) * 255).save(staging / mask_name)
                    row = {"file_name": name, "expression": referent.text, "mask": mask_name,
                           "image_id": str(sample.image_id)}
                    meta.write(json.dumps(row) + "\n")
    return folder


__all__ = ["BadRowError", "ReferringRowsDataset", "read_jsonl", "write_rows_folder"]
