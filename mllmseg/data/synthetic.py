"""A synthetic referring-segmentation dataset: coloured shapes and expressions about them, made on the fly.

It exists so that a tiny model can learn referring segmentation end to end in minutes on a CPU, and so that
the whole pipeline (prompts, ``[SEG]`` / ``[REJ]``, masks, metrics) can be tested without downloads.

Each image holds ``min_objects..max_objects`` non-overlapping shapes (circle, square, triangle, star) in six
colours on a plain, gradient or striped low-saturation background with light noise. Expressions name shapes by

* attributes: ``"the red circle"``, ``"the triangle"``, ``"the blue shape"``;
* relative position among a group: ``"the leftmost shape"``, ``"the topmost red shape"``,
  ``"the bottommost square"``, ``"the rightmost circle"``;
* size among a group: ``"the biggest blue shape"``, ``"the smallest star"``;
* several targets (GRES): ``"all red shapes"``, ``"the two triangles"``, ``"the three blue shapes"``, ``"all shapes"``;
* no target (GRES): ``"the purple star"`` when there is none -> empty mask, ``no_target=True``, ``box=None``.

Every expression is resolved against the scene when it is generated and kept only if it is unambiguous:
attribute expressions must match exactly one object; position / size superlatives need a clear winner
(``position_margin`` of the image side between the first and second centre, ``size_ratio`` between the first
and second pixel area). "Position" is the shape's centre; "size" its pixel area.

Masks are exact: shapes are rasterised once into an object-label map with PIL, the image is painted from that
map, so every mask pixel is a pixel of its shape and vice versa (shapes never overlap, so nothing is occluded).

Samples are deterministic in ``(seed, split, index)``: the random stream of a sample is
``numpy.random.default_rng([seed, crc32(split), index])``, which is the same in every process and worker and
independent of access order. Different ``split`` names give disjoint streams, i.e. held-out images.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .records import Referent, ReferringSample, mask_to_box

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
# Colours a scene may be asked to use (``colors=``) but the default scenes never draw: the quickstart fine-tunes the
# pretrained tiny model on one of them, a concept it has never seen (``mllmseg.quickstart_finetune``).
EXTRA_COLORS: Dict[str, Tuple[int, int, int]] = {
    "cyan": (30, 200, 210),
}
ALL_COLORS: Dict[str, Tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUNDS: Tuple[str, ...] = ("plain", "gradient", "stripes")

# Extent of each shape from its centre, in units of the object's size parameter r (used for placement).
_EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2.0), "triangle": 1.15, "star": 1.2}

_RELATIONS = {
    # relation: (template, attribute to rank by, pick the max?)
    "leftmost": ("the leftmost {np}", "cx", False),
    "rightmost": ("the rightmost {np}", "cx", True),
    "topmost": ("the topmost {np}", "cy", False),
    "bottommost": ("the bottommost {np}", "cy", True),
    "biggest": ("the biggest {np}", "area", True),
    "smallest": ("the smallest {np}", "area", False),
}
_COUNT_WORDS = {2: "two", 3: "three"}
# Expression categories (``Referent.category``; evaluation reports metrics per category): one target named by
# colour and/or shape, one target picked by position or by size among a group, several targets, none.
CATEGORIES: Tuple[str, ...] = ("attribute", "position", "size", "multi", "no_target")


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn shape. ``label`` is its value in the scene's label map; ``area`` its pixel count."""

    label: int
    shape: str
    color: str
    cx: float
    cy: float
    size: float
    angle: float
    area: int


@dataclass(frozen=True)
class SyntheticExpression:
    """An expression with the indices (into ``SyntheticScene.objects``) of the objects it refers to."""

    text: str
    targets: Tuple[int, ...]
    category: str  # one of CATEGORIES: what the expression asks the model to tell apart

    @property
    def kind(self) -> str:
        """``"single"`` (attribute, position, size), ``"multi"`` or ``"no_target"``."""
        return self.category if self.category in ("multi", "no_target") else "single"


@dataclass
class SyntheticScene:
    """Everything generated for one index.

    Attributes:
        image: uint8 ``[H, W, 3]``.
        labels: uint8 ``[H, W]``; 0 is background, ``objects[i].label`` marks object ``i``.
        objects: the drawn shapes, in drawing order.
        expressions: the chosen expressions.
    """

    image: np.ndarray
    labels: np.ndarray
    objects: List[SyntheticObject]
    expressions: List[SyntheticExpression]


def _noun_phrase(color: Optional[str], shape: Optional[str], plural: bool = False) -> str:
    noun = (shape or "shape") + ("s" if plural else "")
    return f"{color} {noun}" if color else noun


class SyntheticReferringDataset:
    """Generated referring-segmentation samples (len / getitem; with ``torch.utils.data.DataLoader`` pass
    ``collate_fn=list`` or a model collator).

    Args:
        num_images: length of the dataset.
        seed: base seed; with ``split`` and the index it fixes each sample.
        split: any name; different names draw from disjoint random streams (``"train"``, ``"validation"``...).
        image_size: ``(H, W)``.
        min_objects, max_objects: shapes per image (fewer when they do not fit without overlapping).
        referents_per_image: expressions per image (fewer when the scene does not offer that many distinct ones).
        no_target_prob: probability that an expression refers to nothing (GRES); 0 for pure RES.
        multi_target_prob: probability that an expression refers to several shapes (GRES); 0 for pure RES.
        size_range: object size as a fraction of ``min(H, W)`` (about the radius).
        noise: amplitude of the uniform per-pixel luminance noise added to the image (0 for none).
        position_margin: minimum gap, as a fraction of the image side, between the extreme centre and the next
            one for "leftmost"-style expressions.
        size_ratio: minimum area ratio between the extreme object and the next for "biggest" / "smallest".
        colors: the colour words scenes draw from (default: the six of ``COLORS``; ``EXTRA_COLORS`` adds others).
        featured_color: a colour of ``colors`` that every scene's first shape wears; each expression then mentions
            it with probability ``featured_prob`` (when the scene offers such an expression). For data about one
            concept: the quickstart's fine-tuning set (``featured_prob`` 0.5) and its held-out set (1.0).

    Each item is a :class:`~mllmseg.data.records.ReferringSample` with the RGB image and one
    :class:`~mllmseg.data.records.Referent` per expression (mask bool ``[H, W]``, box xyxy of the mask).
    """

    def __init__(
        self,
        num_images: int,
        seed: int = 0,
        split: str = "train",
        image_size: Tuple[int, int] = (224, 224),
        min_objects: int = 2,
        max_objects: int = 5,
        referents_per_image: int = 3,
        no_target_prob: float = 0.1,
        multi_target_prob: float = 0.15,
        size_range: Tuple[float, float] = (0.08, 0.18),
        noise: int = 6,
        position_margin: float = 0.08,
        size_ratio: float = 1.3,
        colors: Optional[Sequence[str]] = None,
        featured_color: Optional[str] = None,
        featured_prob: float = 1.0,
    ):
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if max_objects > 254:
            raise ValueError("max_objects must be < 255 (objects are stored in a uint8 label map)")
        if referents_per_image < 1:
            raise ValueError(f"referents_per_image must be >= 1, got {referents_per_image}")
        if not (0 <= no_target_prob and 0 <= multi_target_prob and no_target_prob + multi_target_prob <= 1):
            raise ValueError("no_target_prob and multi_target_prob must be >= 0 and sum to at most 1")
        if not 0 < size_range[0] <= size_range[1] < 0.5:
            raise ValueError(f"size_range must satisfy 0 < low <= high < 0.5, got {size_range}")
        self.colors = tuple(COLORS) if colors is None else tuple(colors)
        unknown = [c for c in self.colors if c not in ALL_COLORS]
        if unknown or not self.colors or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colors must be distinct names among {sorted(ALL_COLORS)}, got {list(self.colors)}")
        if featured_color is not None and featured_color not in self.colors:
            raise ValueError(f"featured_color {featured_color!r} is not one of colors {list(self.colors)}")
        if not 0 <= featured_prob <= 1:
            raise ValueError(f"featured_prob must be in [0, 1], got {featured_prob}")
        self.featured_color = featured_color
        self.featured_prob = float(featured_prob)
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.split = split
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.referents_per_image = referents_per_image
        self.no_target_prob = no_target_prob
        self.multi_target_prob = multi_target_prob
        self.size_range = size_range
        self.noise = int(noise)
        self.position_margin = position_margin
        self.size_ratio = size_ratio
        # crc32, not hash(): str hashes are salted per process, and samples must agree across workers.
        self._split_key = zlib.crc32(split.encode("utf-8"))
        self._palette = np.array([(0, 0, 0)] + [ALL_COLORS[c] for c in self.colors], dtype=np.uint8)  # index 0: unused

    def __len__(self) -> int:
        return self.num_images

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return int(index)

    def __getitem__(self, index: int) -> ReferringSample:
        index = self._check_index(index)
        scene = self.scene(index)
        height, width = self.image_size
        referents = []
        for expr in scene.expressions:
            if expr.targets:
                mask = np.isin(scene.labels, [scene.objects[i].label for i in expr.targets])
            else:
                mask = np.zeros((height, width), dtype=bool)
            referents.append(Referent(text=expr.text, mask=mask, box=mask_to_box(mask),
                                      no_target=not expr.targets, ref_id=None, sent_id=None,
                                      category=expr.category))
        image = Image.fromarray(scene.image)
        return ReferringSample.from_image(f"synthetic/{self.split}/{self.seed}/{index}", image, referents,
                                          split=self.split)

    def scene(self, index: int) -> SyntheticScene:
        """The full generated scene of ``index`` (image, label map, objects, expressions with their targets)."""
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, self._split_key, index])
        height, width = self.image_size
        background = self._background(rng)
        objects, labels = self._draw_objects(rng)
        image = background
        fg = labels > 0
        # Paint shapes from the label map itself, so image and masks cannot disagree.
        color_of_label = np.zeros(len(objects) + 1, dtype=np.int64)
        for obj in objects:
            color_of_label[obj.label] = self.colors.index(obj.color) + 1
        image[fg] = self._palette[color_of_label[labels[fg]]]
        if self.noise > 0:
            # One luminance offset per pixel (broadcast over channels), added in uint8 after clamping into
            # [noise, 255 - noise] so it cannot wrap around.
            n = min(self.noise, 127)
            np.clip(image, n, 255 - n, out=image)
            image += rng.integers(0, 2 * n + 1, size=(height, width, 1), dtype=np.uint8)
            image -= np.uint8(n)
        expressions = self._expressions(rng, objects)
        return SyntheticScene(image=image, labels=labels, objects=objects, expressions=expressions)

    # ------------------------------------------------------------------ image

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """uint8 ``[H, W, 3]`` of low-saturation colours (channel spread <= 40), never equal to a shape colour."""
        height, width = self.image_size

        def dull_color():
            return rng.integers(25, 216) + rng.integers(0, 41, size=3)

        kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        c0 = dull_color()
        if kind == "plain":
            return np.broadcast_to(c0.astype(np.uint8), (height, width, 3)).copy()
        c1 = dull_color()
        if kind == "gradient":
            # Linear ramp c0 -> c1 along a random direction, through a 256-entry colour table (fast).
            theta = rng.uniform(0, 2 * math.pi)
            xs = np.arange(width, dtype=np.float32) * math.cos(theta)
            ys = np.arange(height, dtype=np.float32) * math.sin(theta)
            t = ys[:, None] + xs[None, :]
            lo, hi = float(t.min()), float(t.max())
            level = ((t - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
            table = (c0 + (c1 - c0) * np.linspace(0.0, 1.0, 256)[:, None]).astype(np.uint8)
            return table[level]
        # stripes: horizontal or vertical bands of two colours
        period = int(rng.integers(8, 33))
        if rng.random() < 0.5:
            band = (np.arange(height) // period) % 2
            band = np.broadcast_to(band[:, None], (height, width))
        else:
            band = (np.arange(width) // period) % 2
            band = np.broadcast_to(band[None, :], (height, width))
        return np.where(band[..., None] == 0, c0, c1).astype(np.uint8)

    def _draw_objects(self, rng: np.random.Generator) -> Tuple[List[SyntheticObject], np.ndarray]:
        height, width = self.image_size
        side = min(height, width)
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        placed = []  # (shape, color, cx, cy, size, angle, extent)
        for k in range(count):
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = self.colors[rng.integers(len(self.colors))]
            if k == 0 and self.featured_color is not None:
                color = self.featured_color
            size = rng.uniform(*self.size_range) * side
            for attempt in range(40):
                # Crowded scene: shrink the shape every 10 misses (not below the smallest size) so it fits.
                if attempt and attempt % 10 == 0:
                    size = max(0.8 * size, self.size_range[0] * side)
                size = max(size, 3.0)
                extent = _EXTENT[shape] * size
                if 2 * extent + 4 > side:
                    continue
                cx = rng.uniform(extent + 1, width - extent - 2)
                cy = rng.uniform(extent + 1, height - extent - 2)
                # Keep a 3-pixel gap between bounding circles: no overlap, no touching, exact masks.
                if all(math.hypot(cx - p[2], cy - p[3]) >= extent + p[6] + 3 for p in placed):
                    placed.append((shape, color, cx, cy, size, float(rng.uniform(0, 2 * math.pi)), extent))
                    break

        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for k, (shape, _, cx, cy, size, angle, _) in enumerate(placed):
            if shape == "circle":
                draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=k + 1)
            else:
                draw.polygon(_polygon(shape, cx, cy, size, angle), fill=k + 1)
        labels = np.asarray(canvas).copy()
        areas = np.bincount(labels.ravel(), minlength=len(placed) + 1)
        objects = [
            SyntheticObject(label=k + 1, shape=p[0], color=p[1], cx=p[2], cy=p[3], size=p[4], angle=p[5],
                            area=int(areas[k + 1]))
            for k, p in enumerate(placed)
        ]
        return objects, labels

    # ------------------------------------------------------------------ expressions

    def _candidates(self, objects: Sequence[SyntheticObject]) -> Dict[str, List[SyntheticExpression]]:
        """Every unambiguous expression the scene offers, by kind."""
        height, width = self.image_size
        out: Dict[str, List[SyntheticExpression]] = {"attribute": [], "relation": [], "multi": [], "no_target": []}
        for color in (None,) + self.colors:
            for shape in (None,) + SHAPES:
                match = tuple(i for i, o in enumerate(objects)
                              if (color is None or o.color == color) and (shape is None or o.shape == shape))
                named = color is not None or shape is not None
                if len(match) == 0:
                    if named:
                        out["no_target"].append(
                            SyntheticExpression(f"the {_noun_phrase(color, shape)}", (), "no_target"))
                    continue
                if len(match) == 1:
                    if named:
                        out["attribute"].append(
                            SyntheticExpression(f"the {_noun_phrase(color, shape)}", match, "attribute"))
                    continue
                plural = _noun_phrase(color, shape, plural=True)
                out["multi"].append(SyntheticExpression(f"all {plural}", match, "multi"))
                if len(match) in _COUNT_WORDS:
                    out["multi"].append(SyntheticExpression(f"the {_COUNT_WORDS[len(match)]} {plural}", match, "multi"))
                for template, key, pick_max in _RELATIONS.values():
                    winner = self._superlative(objects, match, key, pick_max, height, width)
                    if winner is not None:
                        out["relation"].append(SyntheticExpression(
                            template.format(np=_noun_phrase(color, shape)), (winner,),
                            "size" if key == "area" else "position"))
        return out

    def _superlative(self, objects, match, key, pick_max, height, width) -> Optional[int]:
        """Index of the clear winner of ``match`` by ``key`` (None when the top two are too close)."""
        ranked = sorted(match, key=lambda i: getattr(objects[i], key), reverse=pick_max)
        first, second = getattr(objects[ranked[0]], key), getattr(objects[ranked[1]], key)
        if key == "area":
            big, small = max(first, second), min(first, second)
            return ranked[0] if big >= self.size_ratio * max(small, 1) else None
        gap = self.position_margin * (width if key == "cx" else height)
        return ranked[0] if abs(first - second) >= gap else None

    def _expressions(self, rng: np.random.Generator, objects: Sequence[SyntheticObject]) -> List[SyntheticExpression]:
        pools = self._candidates(objects)
        chosen: List[SyntheticExpression] = []
        used = set()
        enabled = {"single": True, "multi": self.multi_target_prob > 0, "no_target": self.no_target_prob > 0}
        featured = None
        if self.featured_color is not None:  # the expressions that mention the featured colour, by kind
            featured = {g: [e for e in options if self.featured_color in e.text.split()] for g, options in pools.items()}
        for _ in range(self.referents_per_image):
            pools_now = pools
            if featured is not None and rng.random() < self.featured_prob:
                if any(e.text not in used for options in featured.values() for e in options):
                    pools_now = featured
            u = rng.random()
            if u < self.no_target_prob:
                primary = "no_target"
            elif u < self.no_target_prob + self.multi_target_prob:
                primary = "multi"
            else:
                primary = "single"
            # When the drawn kind has nothing left, fall back to single, then to the other *enabled* kind, so
            # that no_target_prob=0 (or multi_target_prob=0) really means none of those.
            order = [primary] + [k for k in ("single", "multi", "no_target") if k != primary and enabled[k]]
            for kind in order:
                if kind == "single":
                    # Choose attribute vs relation first, so that relational expressions are not swamped.
                    groups = [g for g in ("attribute", "relation") if any(e.text not in used for e in pools_now[g])]
                    if not groups:
                        continue
                    group = groups[rng.integers(len(groups))]
                else:
                    group = kind
                options = [e for e in pools_now[group] if e.text not in used]
                if options:
                    expr = options[rng.integers(len(options))]
                    chosen.append(expr)
                    used.add(expr.text)
                    break
        return chosen


def _polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a square, triangle or 5-point star of size ``size`` centred on ``(cx, cy)``, rotated by ``angle``."""
    if shape == "square":
        radius, angles = 0.85 * math.sqrt(2.0) * size, [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [radius] * 4
    elif shape == "triangle":
        angles = [angle - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [1.15 * size] * 3
    elif shape == "star":
        angles = [angle - math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [1.2 * size if k % 2 == 0 else 0.6 * size for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]
