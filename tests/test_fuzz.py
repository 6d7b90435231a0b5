"""Property-based fuzzing (hypothesis) of what users hand the package: images of every mode, size and array layout,
expression and question strings with special-token text, annotation polygons and rows, `segment`'s and the
processor's arguments, and the `segment` command's arguments.

Invariants: nothing fails except with the project's own errors (`ImageLoadError`, `BadSegmentationError`,
`BadRowError`, or a `ValueError` / `TypeError` naming the argument); masks come back at the image's size; one result
per expression; user text never becomes a control token; the CLI writes nothing outside its output folder.

Bounded and seeded for CI (`derandomize=True`, the `ci` profile); `HYPOTHESIS_PROFILE=long` runs 20x more examples
by hand.
"""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mllmseg.data.masks import BadSegmentationError, decode_segmentation
from mllmseg.remote_code.image_processing_mllmseg import ImageLoadError, load_image
from mllmseg.tiny import build_processor, build_tiny_model

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

CONTROL = ["[SEG]", "[REJ]", "<|im_end|>", "<|im_start|>", "<IMG_CONTEXT>", "<img>", "</img>", "<image>", "\n",
           "<|endoftext|>", "\ue000", "\ue001", "assistant\n", ":", ",", "."]
text = st.lists(st.one_of(st.sampled_from(CONTROL), st.text(min_size=0, max_size=6)), min_size=0, max_size=6).map("".join)
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I;16", "I", "F", "CMYK", "YCbCr", "RGBX", "La", "RGBa"]


@pytest.fixture(scope="module")
def tiny_setup():
    model, tok = build_tiny_model(seed=0)
    return model, tok, build_processor(tok, model.config)


@st.composite
def pil_images(draw):
    w, h = draw(st.integers(1, 160)), draw(st.integers(1, 160))
    seed = draw(st.integers(0, 2**16))
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    mode = draw(st.sampled_from(MODES))
    for source in (rgb, rgb.convert("L"), rgb.convert("RGBA")):
        try:
            return source.convert(mode)
        except ValueError:  # a conversion this Pillow release does not offer
            continue
    assume(False)


@st.composite
def arrays(draw):
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    layout = draw(st.sampled_from(["HW", "HW1", "HW3", "HW4", "3HW", "1HW"]))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.bool_, np.int64, np.float64]))
    shape = {"HW": (h, w), "HW1": (h, w, 1), "HW3": (h, w, 3), "HW4": (h, w, 4), "3HW": (3, h, w), "1HW": (1, h, w)}[layout]
    values = np.random.default_rng(draw(st.integers(0, 999))).random(shape)
    if dtype in (np.uint8, np.uint16, np.int64):
        values = values * (255 if dtype == np.uint8 else 65535)
    return values.astype(dtype), (h, w)


@given(pil_images())
def test_any_pil_image_loads_as_rgb_of_its_size(image):
    out = load_image(image)
    assert out.mode == "RGB" and out.size == image.size


@given(arrays())
def test_any_array_loads_or_is_refused_clearly(case):
    array, (h, w) = case
    try:
        out = load_image(array)
    except ImageLoadError as error:
        assert str(error)  # a reason, not an empty message
        return
    # A channels-first array whose last axis could also be channels ((3, H, 1), (1, H, 4), ...) is ambiguous:
    # NumPy arrays are read channels-last then, as the loader documents.
    ambiguous = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] in (1, 3, 4)
    assert out.mode == "RGB" and (out.size == (w, h) or (ambiguous and out.size == (array.shape[1], array.shape[0])))


@given(question=text)
def test_questions_never_produce_control_tokens(tiny_setup, question):
    _, tok, proc = tiny_setup
    ids = proc(text=[question])["input_ids"][0].tolist()
    count = {t: ids.count(tok.convert_tokens_to_ids(t)) for t in ("<|im_start|>", "<|im_end|>", "[SEG]", "[REJ]",
                                                                    "<IMG_CONTEXT>", "<img>")}
    assert count == {"<|im_start|>": 3, "<|im_end|>": 2, "[SEG]": 0, "[REJ]": 0, "<IMG_CONTEXT>": 0, "<img>": 0}


@given(expressions=st.lists(text.filter(lambda e: e.strip().strip(".")), min_size=1, max_size=3),
       w=st.integers(1, 90), h=st.integers(1, 90), mode=st.sampled_from(["fast", "generate"]))
def test_segment_gives_one_result_per_expression_at_the_image_size(tiny_setup, expressions, w, h, mode):
    model, tok, proc = tiny_setup
    image = Image.new("RGB", (w, h), (200, 30, 30))
    result = model.segment(proc, image, expressions, mode=mode, max_new_tokens=3)
    assert result.masks.shape == (len(expressions), h, w) and result.masks.dtype == torch.bool
    assert result.boxes.shape == (len(expressions), 4) and len(result.rejected) == len(expressions)


coordinate = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**9, 10**9))


@given(polygons=st.lists(st.lists(coordinate, min_size=0, max_size=12), min_size=0, max_size=3),
       h=st.integers(1, 60), w=st.integers(1, 60))
def test_any_polygon_decodes_or_is_refused_naming_it(polygons, h, w):
    try:
        mask = decode_segmentation(polygons, h, w)
    except BadSegmentationError as error:
        assert "polygon" in str(error)
        return
    assert mask.shape == (h, w) and mask.dtype == bool
    flat = [v for p in polygons for v in p]
    assert all(math.isfinite(v) for v in flat)


@given(batch_size=st.one_of(st.integers(-3, 4), st.floats(allow_nan=True), st.none(), st.booleans()),
       threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.none()),
       mode=st.sampled_from(["fast", "generate", "beam", ""]), tiling=st.sampled_from([None, "single", "dynamic", "x"]))
def test_segment_arguments_are_accepted_or_refused_by_name(tiny_setup, batch_size, threshold, mode, tiling):
    model, tok, proc = tiny_setup
    image = Image.new("RGB", (40, 30), (0, 0, 200))
    try:
        results = model.segment(proc, [image, image], [["the blue square"], ["a", "b"]], mode=mode, tiling=tiling,
                                batch_size=batch_size, threshold=threshold, max_new_tokens=2)
    except (ValueError, TypeError) as error:
        names = ("batch_size", "threshold", "mode", "tiling")
        assert any(name in str(error) for name in names), str(error)
        return
    assert [r.masks.shape for r in results] == [(1, 30, 40), (2, 30, 40)]


# ----------------------------------------------------------------------------------------------- processor API

junk = st.one_of(st.none(), st.binary(max_size=8), st.integers(-3, 3), st.floats(allow_nan=True), text,
                 st.lists(text, max_size=2), st.tuples(text), st.tuples(text, text))


@given(texts=st.one_of(junk, st.lists(junk, min_size=1, max_size=3)),
       answers=st.one_of(st.none(), junk, st.lists(junk, min_size=1, max_size=3)),
       history=st.one_of(st.none(), st.lists(st.one_of(st.none(), st.lists(junk, max_size=2)), min_size=1, max_size=3)),
       images=st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(0, 2), st.sampled_from(["rgb", "empty",
                                                                                                    "nan"])),
                                            min_size=1, max_size=3)))
def test_processor_arguments_work_or_are_refused_by_name(tiny_setup, texts, answers, history, images):
    """Any mix of text / answers / history / images: a batch, or a ValueError / TypeError / ImageLoadError that
    names the argument (and for list items their index)."""
    _, tok, proc = tiny_setup
    made = {"rgb": Image.new("RGB", (9, 7)), "empty": Image.new("RGB", (0, 4)),
            "nan": np.full((4, 4, 3), np.nan, dtype=np.float32)}
    image_arg = None if images is None else [made.get(i, i) if isinstance(i, str) else i for i in images]
    try:
        batch = proc(images=image_arg, text=texts, answers=answers, history=history)
    except (ValueError, TypeError) as error:  # ImageLoadError is a ValueError
        message = str(error)
        assert any(name in message for name in ("text", "answers", "history", "images", "Image", "got neither")), \
            message
        return
    assert batch["input_ids"].shape[0] == (1 if isinstance(texts, str) else len(texts))


# ----------------------------------------------------------------------------------------------- annotation rows

mask_values = st.one_of(
    st.none(), st.integers(-2, 2), st.binary(max_size=6), text,
    st.lists(st.lists(coordinate, max_size=10), max_size=2),  # polygons, good or bad
    st.fixed_dictionaries({"size": st.lists(st.integers(-1, 40), max_size=3),
                           "counts": st.one_of(text, st.lists(st.integers(-5, 200), max_size=6))}),  # RLE
    st.tuples(st.integers(0, 12), st.integers(0, 12)).map(lambda s: np.ones(s, dtype=bool)),  # arrays of any size
)


@given(rows=st.lists(st.fixed_dictionaries({
    "image": st.one_of(st.sampled_from(["pil", "missing.png"]), st.none(), st.integers(0, 3)),
    "expression": st.one_of(text, st.none(), st.integers(), st.lists(st.one_of(text, st.none()), max_size=3)),
    "mask": mask_values,
}), min_size=1, max_size=3))
def test_random_annotation_rows_load_or_fail_with_the_projects_errors(tmp_path_factory, rows):
    """Random rows through the rows loader: a sample with one bool mask of the image's size per referent, or the
    project's own errors (BadRowError / BadSegmentationError / BadRecordError, FileNotFoundError naming the path)."""
    from mllmseg.data.records import BadRecordError
    from mllmseg.data.rows import BadRowError, ReferringRowsDataset

    image = Image.new("RGB", (12, 10), (10, 20, 30))
    rows = [dict(row, image=image if row["image"] == "pil" else row["image"]) for row in rows]
    root = tmp_path_factory.mktemp("rows")
    try:
        dataset = ReferringRowsDataset(rows, image_root=root)
        samples = [dataset[i] for i in range(len(dataset))]
    except (BadRowError, BadSegmentationError, BadRecordError) as error:
        assert "row" in str(error) or "rows" in str(error), str(error)
        return
    except FileNotFoundError as error:
        assert "missing.png" in str(error)
        return
    for sample in samples:
        for referent in sample.referents:
            mask = referent.mask
            assert mask is None or (mask.shape == (10, 12) and mask.dtype == bool)


# ----------------------------------------------------------------------------------------------- nothing written outside

def _tree(*roots):
    """Every file under `roots`: path -> (size, mtime_ns)."""
    files = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() or path.is_symlink():
                stat = path.lstat()
                files[path] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    from mllmseg.cli import main as cli_main  # noqa: F401  (the CLI's imports happen here, not in the property)

    model, tok = build_tiny_model(seed=0)
    folder = tmp_path_factory.mktemp("fuzz-cli") / "model"
    model.save_pretrained(folder)
    build_processor(tok, model.config).save_pretrained(folder)
    return folder


# Mostly valid arguments (so most runs load the model and write their outputs), some of every kind of mistake.
good_expressions = st.lists(text.filter(lambda e: e.strip().strip(".") and not e.startswith("-")), min_size=1,
                            max_size=3)


@given(image=st.sampled_from(["photo.png"] * 5 + ["notes.png", "missing.png", "http://127.0.0.1:9/x.png"]),
       expressions=st.one_of(good_expressions, good_expressions, good_expressions, st.lists(text, max_size=3)),
       threshold=st.one_of(st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.05, 0.95),
                           st.sampled_from(["nan", "-1", "2", "x"])),
       tiling=st.sampled_from([None, "single", "dynamic"]), mode=st.sampled_from(["fast", "generate"]),
       out=st.sampled_from(["overlay.png", "sub/dir/o.png", "overlay.jpg"]), with_json=st.booleans())
def test_segment_cli_writes_nothing_outside_its_output_folder(cli_checkpoint, tmp_path_factory, monkeypatch, image,
                                                              expressions, threshold, tiling, mode, out, with_json):
    """`mllmseg segment` with random arguments, run in a fresh working folder with every cache (HF_HOME, the
    transformers modules cache, XDG_CACHE_HOME, TMPDIR) in a watched temporary folder: it succeeds or exits 2, and
    no file appears or changes anywhere watched except inside the output folder."""
    from transformers.utils import hub as hf_hub

    from mllmseg.cli import main as cli_main

    cwd = tmp_path_factory.mktemp("cwd")
    caches = tmp_path_factory.mktemp("caches")
    for name in ("HF_HOME", "XDG_CACHE_HOME", "TMPDIR", "GRADIO_TEMP_DIR", "MPLCONFIGDIR"):
        monkeypatch.setenv(name, str(caches / name.lower()))
    make_shapes = Image.new("RGB", (40, 30), (200, 30, 30))
    make_shapes.save(cwd / "photo.png")
    (cwd / "notes.png").write_text("not an image")
    monkeypatch.chdir(cwd)
    out_dir = cwd / "out"
    argv = ["segment", str(cli_checkpoint), image, *expressions, "--out", str(Path("out") / out),
            f"--threshold={threshold}", "--mode", mode]
    argv += ["--tiling", tiling] if tiling else []
    argv += ["--json", "out/result.json"] if with_json else []
    modules = Path(hf_hub.HF_MODULES_CACHE)  # where transformers copies remote code (fixed when it was imported)
    watched = [cwd, caches, cli_checkpoint.parent, modules]
    before = _tree(*watched)
    try:
        code = cli_main(argv)
    except SystemExit as exit_:  # argparse's own usage errors (a bad float, an expression that looks like a flag)
        code = exit_.code
    assert code in (0, 2)
    after = _tree(*watched)
    changed = {p for p in after if before.get(p) != after[p]} | (set(before) - set(after))
    outside = {p for p in changed if out_dir not in p.parents}
    assert not outside, (argv, sorted(map(str, outside)))
    if code == 0:
        assert (out_dir / out).is_file()
