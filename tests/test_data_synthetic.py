"""SyntheticReferringDataset: determinism, exact masks, and expressions that mean what their masks say.

The expression checks re-derive every target from the text with their own parser and from the pixels (label-map
centroids and areas), not from the generator's bookkeeping.
"""
import hashlib
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mllmseg.data.synthetic import ALL_COLORS, COLORS, SHAPES, SyntheticReferringDataset

NOUNS = {s: s for s in SHAPES} | {"shape": None}
COLOR_RE = "|".join(ALL_COLORS)
NOUN_RE = "|".join(NOUNS)
SUPERLATIVES = {  # word -> (quantity, pick largest?)
    "leftmost": ("x", False), "rightmost": ("x", True), "topmost": ("y", False), "bottommost": ("y", True),
    "biggest": ("area", True), "smallest": ("area", False),
}


def _digest(sample):
    h = hashlib.sha256(np.asarray(sample.image).tobytes())
    for r in sample.referents:
        h.update(r.text.encode())
        h.update(np.packbits(r.mask).tobytes())
    return h.hexdigest()


def _parse(text):
    """-> (form, color, noun, extra) from the expression text alone."""
    m = re.fullmatch(rf"the ({'|'.join(SUPERLATIVES)}) (?:({COLOR_RE}) )?({NOUN_RE})", text)
    if m:
        return "superlative", m.group(2), NOUNS[m.group(3)], m.group(1)
    m = re.fullmatch(rf"(all|the two|the three) (?:({COLOR_RE}) )?({NOUN_RE})s", text)
    if m:
        return "group", m.group(2), NOUNS[m.group(3)], {"all": None, "the two": 2, "the three": 3}[m.group(1)]
    m = re.fullmatch(rf"the (?:({COLOR_RE}) )?({NOUN_RE})", text)
    assert m and (m.group(1) or NOUNS[m.group(2)]), f"unexpected expression {text!r}"
    return "named", m.group(1), NOUNS[m.group(2)], None


def _expected_labels(text, scene):
    """Object labels the text refers to, recomputed from the scene's pixels and object attributes."""
    form, color, shape, extra = _parse(text)
    group = [o for o in scene.objects if (color is None or o.color == color) and (shape is None or o.shape == shape)]
    if form == "named":
        assert len(group) <= 1, f"{text!r} is ambiguous: {len(group)} matches"
        return [o.label for o in group]
    if form == "group":
        assert len(group) >= 2 and (extra is None or len(group) == extra), f"{text!r} has {len(group)} matches"
        return [o.label for o in group]
    quantity, largest = SUPERLATIVES[extra]
    assert len(group) >= 2, f"{text!r} compares fewer than two objects"
    values = []
    for o in group:
        ys, xs = np.nonzero(scene.labels == o.label)
        values.append({"x": xs.mean(), "y": ys.mean(), "area": xs.size}[quantity])
    order = np.argsort(values)[::-1] if largest else np.argsort(values)
    best, second = values[order[0]], values[order[1]]
    # unambiguous: a visible gap to the runner-up (pixel centroids / areas, looser than the generator's margins)
    if quantity == "area":
        assert max(best, second) >= 1.2 * min(best, second), f"{text!r}: sizes {best} vs {second}"
    else:
        assert abs(best - second) >= 0.05 * scene.labels.shape[1 if quantity == "x" else 0], text
    return [group[order[0]].label]


def test_same_index_same_sample_in_this_and_another_process():
    ds = SyntheticReferringDataset(50, seed=3)
    digests = [_digest(ds[i]) for i in (0, 7, 49)]
    assert digests == [_digest(SyntheticReferringDataset(50, seed=3)[i]) for i in (0, 7, 49)]
    assert _digest(ds[7]) == digests[1]  # access order does not matter
    assert _digest(pickle.loads(pickle.dumps(ds[7]))) == digests[1]  # samples can cross worker processes
    assert len(set(digests)) == 3
    # A fresh interpreter (new hash salt, new RNG state). It imports only the data subpackage: the package
    # __init__ may pull in the model stack, which this check does not need.
    code = (
        "import hashlib, sys, types, numpy as np\n"
        "sys.modules['mllmseg'] = types.ModuleType('mllmseg'); sys.modules['mllmseg'].__path__ = ['mllmseg']\n"
        "from mllmseg.data.synthetic import SyntheticReferringDataset\n"
        "ds = SyntheticReferringDataset(50, seed=3)\n"
        "for i in (0, 7, 49):\n"
        "    s = ds[i]; h = hashlib.sha256(np.asarray(s.image).tobytes())\n"
        "    for r in s.referents: h.update(r.text.encode()); h.update(np.packbits(r.mask).tobytes())\n"
        "    print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == digests


def test_splits_and_seeds_give_different_images():
    train = {_digest(SyntheticReferringDataset(20, split="train")[i]) for i in range(20)}
    held_out = {_digest(SyntheticReferringDataset(20, split="validation")[i]) for i in range(20)}
    other_seed = {_digest(SyntheticReferringDataset(20, seed=1)[i]) for i in range(20)}
    assert len(train) == 20 and not train & held_out and not train & other_seed


def test_masks_are_exactly_the_drawn_pixels():
    ds = SyntheticReferringDataset(30, noise=0, image_size=(160, 192))
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert scene.image.shape == (160, 192, 3)
        for color, rgb in COLORS.items():
            painted = np.all(scene.image == np.array(rgb, dtype=np.uint8), axis=-1)
            labels = [o.label for o in scene.objects if o.color == color]
            # every pixel of this colour belongs to a shape of this colour, and vice versa
            assert np.array_equal(painted, np.isin(scene.labels, labels)), (i, color)
        for o in scene.objects:
            assert o.area == int((scene.labels == o.label).sum()) > 50


def test_expressions_refer_to_exactly_their_masks():
    ds = SyntheticReferringDataset(60, seed=11, no_target_prob=0.2, multi_target_prob=0.2, referents_per_image=4)
    forms = Counter()
    for i in range(len(ds)):
        sample, scene = ds[i], ds.scene(i)
        assert (sample.height, sample.width) == (224, 224) and sample.image.size == (224, 224)
        texts = [r.text for r in sample.referents]
        assert 1 <= len(texts) <= 4 and len(set(texts)) == len(texts)
        for referent in sample.referents:
            labels = _expected_labels(referent.text, scene)
            forms[_parse(referent.text)[0] if labels else "no_target"] += 1
            assert referent.mask.dtype == bool and referent.mask.shape == (224, 224)
            assert np.array_equal(referent.mask, np.isin(scene.labels, labels)), referent.text
            assert referent.no_target == (not labels)
            if labels:
                ys, xs = np.nonzero(referent.mask)
                assert referent.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            else:
                assert referent.box is None and not referent.mask.any()
    assert min(forms.values()) >= 10 and set(forms) == {"named", "group", "superlative", "no_target"}, forms


def test_target_kind_probabilities():
    def kinds(ds):
        c = Counter()
        for i in range(len(ds)):
            for e in ds.scene(i).expressions:
                c[e.kind] += 1
        return c

    res = kinds(SyntheticReferringDataset(80, no_target_prob=0.0, multi_target_prob=0.0))
    assert set(res) == {"single"} and res["single"] >= 200
    mixed = kinds(SyntheticReferringDataset(100, no_target_prob=0.3, multi_target_prob=0.3))
    total = sum(mixed.values())
    assert 0.2 < mixed["no_target"] / total < 0.4  # no-target expressions always exist, so ~0.3
    assert 0.15 < mixed["multi"] / total < 0.4  # falls back to single when a scene has no group
    assert all(len(e.targets) >= 2 for i in range(10) for e in
               SyntheticReferringDataset(10, multi_target_prob=1.0, no_target_prob=0.0).scene(i).expressions
               if e.kind == "multi")


def test_objects_fit_and_do_not_touch():
    ds = SyntheticReferringDataset(40, image_size=(96, 160), min_objects=3, max_objects=6)
    counts = Counter()
    for i in range(len(ds)):
        scene = ds.scene(i)
        counts[len(scene.objects)] += 1
        labels = scene.labels
        # no shape reaches the border, and no two labels are 4-neighbours (gap between shapes)
        assert not labels[0].any() and not labels[-1].any() and not labels[:, 0].any() and not labels[:, -1].any()
        a, b = labels[:, :-1], labels[:, 1:]
        assert not np.any((a > 0) & (b > 0) & (a != b))
        a, b = labels[:-1], labels[1:]
        assert not np.any((a > 0) & (b > 0) & (a != b))
    assert min(counts) >= 1 and max(counts) <= 6 and len(counts) >= 3


@pytest.mark.parametrize("kwargs", [
    {"num_images": -1}, {"num_images": 5, "min_objects": 0}, {"num_images": 5, "min_objects": 4, "max_objects": 3},
    {"num_images": 5, "no_target_prob": 0.7, "multi_target_prob": 0.5}, {"num_images": 5, "size_range": (0.3, 0.6)},
    {"num_images": 5, "referents_per_image": 0},
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticReferringDataset(**kwargs)


def test_index_bounds():
    ds = SyntheticReferringDataset(3)
    assert _digest(ds[-1]) == _digest(ds[2]) and ds[-1].image_id == ds[2].image_id
    with pytest.raises(IndexError):
        ds[3]


def test_every_expression_has_the_category_its_words_say():
    from mllmseg.data.synthetic import CATEGORIES

    ds = SyntheticReferringDataset(60, no_target_prob=0.2, multi_target_prob=0.2)
    seen = Counter()
    for i in range(len(ds)):
        scene, sample = ds.scene(i), ds[i]
        for expr, referent in zip(scene.expressions, sample.referents):
            assert referent.category == expr.category in CATEGORIES
            words = set(expr.text.split())
            expected = ("no_target" if not expr.targets else "multi" if len(expr.targets) > 1
                        else "position" if words & {"leftmost", "rightmost", "topmost", "bottommost"}
                        else "size" if words & {"biggest", "smallest"} else "attribute")
            assert expr.category == expected, expr
            seen[expr.category] += 1
    assert set(seen) == set(CATEGORIES)


def _stream_digest(ds):
    # The random draws (every object's shape, colour, place, size, angle) and every expression's text, targets and
    # category. Not the pixels: Pillow's rasteriser moves a few edge pixels between releases (10.0 vs 12.x: 48 of
    # 752,640 values in these 20 scenes), and CI runs both.
    h = hashlib.sha256()
    for i in range(len(ds)):
        scene = ds.scene(i)
        for o in scene.objects:
            h.update(repr((o.label, o.shape, o.color, o.cx, o.cy, o.size, o.angle)).encode())
        for e in scene.expressions:
            h.update(repr((e.text, e.targets, e.category)).encode())
    return h.hexdigest()


def test_default_scenes_are_those_the_from_scratch_results_were_measured_on():
    # Digest of these 20 scenes computed with the generator before `colors` / `featured_color` existed (commit
    # 9cc1ce6, same value with Pillow 10.0 and 12.x): the new options must not move the default random stream
    # (README's from-scratch quickstart tables).
    ds = SyntheticReferringDataset(20, seed=3, split="train", image_size=(112, 112), referents_per_image=5)
    assert _stream_digest(ds) == "28ee4f360f5851cb5e5fb076a1f0c9d9fe19f8341430061bba16fb869f701f9f"
    explicit = SyntheticReferringDataset(20, seed=3, split="train", image_size=(112, 112), referents_per_image=5,
                                         colors=tuple(COLORS))
    assert _stream_digest(explicit) == _stream_digest(ds)
    # what the draws are rendered into: the same pixels, masks and texts
    for i in (0, 7, 19):
        a, b = ds[i], explicit[i]
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert [r.text for r in a.referents] == [r.text for r in b.referents]
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.referents, b.referents))


def test_extra_colours_appear_only_when_asked_for():
    extra = set(ALL_COLORS) - set(COLORS)
    assert extra == {"cyan"}
    ds = SyntheticReferringDataset(150, referents_per_image=5)
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert not extra & {o.color for o in scene.objects}
        assert not any(extra & set(e.text.split()) for e in scene.expressions)


def test_a_featured_colour_is_in_every_scene_and_every_expression():
    colors = tuple(COLORS) + ("cyan",)
    ds = SyntheticReferringDataset(80, colors=colors, featured_color="cyan", featured_prob=1.0,
                                   referents_per_image=5, no_target_prob=0.2)
    seen = Counter()
    cyan = np.array(ALL_COLORS["cyan"])
    for i in range(len(ds)):
        scene, sample = ds.scene(i), ds[i]
        assert scene.objects[0].color == "cyan"
        # painted in its colour (within the noise), exactly where its label is
        pixels = scene.image[scene.labels == scene.objects[0].label].astype(int)
        assert np.abs(pixels - cyan).max() <= ds.noise
        for expr, referent in zip(scene.expressions, sample.referents):
            assert "cyan" in expr.text.split(), expr.text
            labels = _expected_labels(expr.text, scene)
            assert np.array_equal(referent.mask, np.isin(scene.labels, labels) & (scene.labels > 0))
            seen[expr.category] += 1
    # every kind of expression about the new colour occurs, including "the cyan star" where there is none
    assert all(seen[c] > 0 for c in ("attribute", "position", "multi", "no_target")), seen


def test_featured_probability_mixes_old_and_new_expressions():
    ds = SyntheticReferringDataset(100, colors=tuple(COLORS) + ("cyan",), featured_color="cyan", featured_prob=0.5,
                                   referents_per_image=4)
    mentions = [("cyan" in e.text.split()) for i in range(len(ds)) for e in ds.scene(i).expressions]
    assert 0.4 < np.mean(mentions) < 0.75  # half drawn about cyan, plus old-form ones that happen to name it


@pytest.mark.parametrize("kwargs, word", [
    ({"colors": ("red", "teal")}, "teal"), ({"colors": ("red", "red")}, "distinct"), ({"colors": ()}, "distinct"),
    ({"featured_color": "cyan"}, "cyan"), ({"colors": ("red", "cyan"), "featured_prob": 1.5}, "featured_prob"),
])
def test_bad_colour_arguments_name_the_problem(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SyntheticReferringDataset(5, **kwargs)
