"""The web demo's limits, through its Python functions and its real Gradio server: uploads arrive as file paths
and are opened with the project's guarded loader (size checked on the header, before decoding), expressions and
pixels per request are capped, results keep bool masks only, non-images get a clear message, and Gradio's server
refuses uploads over `max_file_size`. (tests/test_demo_browser.py drives the same app in a real browser.)"""
import io
import json
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from mllmseg.cli import main as cli_main
from mllmseg.demo import DemoLimits, chat_turn, model_title, segment_compact, segment_image
from mllmseg.remote_code.image_processing_mllmseg import ImageLoadError, ImageTooLargeError, load_image
from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.visualize import draw_overlay

from .test_cli_segment_chat import make_image


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny_model(seed=0)
    return model.eval(), build_processor(tok, model.config)


@pytest.fixture
def shapes(tmp_path):
    path = tmp_path / "shapes.png"
    make_image(path, size=(40, 30))
    return path


def header_only_png(path, size):
    """A PNG whose header claims `size` but whose pixel data is cut off after 200 bytes: decoding it would fail
    as truncated, so an ImageTooLargeError proves the size was refused before decoding."""
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:200])
    return path


def test_a_decompression_bomb_upload_is_refused_before_decoding(tiny, tmp_path):
    """The issue's case: a small PNG of 144 MP (5 GB and a minute in the old demo, which let Gradio decode it)."""
    model, processor = tiny
    bomb = header_only_png(tmp_path / "bomb.png", (12000, 12000))
    with pytest.raises(ImageTooLargeError, match=r"bomb.png.* over Pillow's decompression-bomb limit .*144000000"):
        segment_image(model, processor, str(bomb), "the red circle")
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        chat_turn(model, processor, str(bomb), "Describe the image.", None)
    # Under Pillow's limit but over the demo's own (16 MP by default): refused on the header as well.
    big = header_only_png(tmp_path / "big.png", (5000, 4000))
    with pytest.raises(ImageTooLargeError, match=r"big.png.* 5000x4000 = 20000000 pixels, over the limit of 16000000"):
        segment_image(model, processor, str(big), "the red circle")
    with pytest.raises(ImageTooLargeError, match="20000000 pixels"):
        chat_turn(model, processor, str(big), "Describe the image.", None)


def test_the_pixel_cap_is_exact_and_pillows_limit_still_applies(tiny, shapes, monkeypatch):
    model, processor = tiny
    with pytest.raises(ImageTooLargeError, match="40x30 = 1200 pixels, over the limit of 1199"):
        segment_image(model, processor, str(shapes), "the red circle", limits=DemoLimits(max_pixels=1199))
    with pytest.raises(ImageTooLargeError, match="over the limit of 1199"):  # PIL images from Python too
        segment_image(model, processor, Image.open(shapes), "the red circle", limits=DemoLimits(max_pixels=1199))
    overlay, rows, _ = segment_image(model, processor, str(shapes), "the red circle", limits=DemoLimits(max_pixels=1200))
    assert overlay.size[0] == 40 and len(rows) == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the CLI's guard (Pillow's decompression-bomb limit)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS=500"):
        segment_image(model, processor, str(shapes), "the red circle")


def test_expressions_per_request_are_capped(tiny, shapes):
    model, processor = tiny
    with pytest.raises(ValueError, match="11 expressions: this demo takes at most 10 per request"):
        segment_image(model, processor, str(shapes), "; ".join(f"thing {k}" for k in range(11)))
    limits = DemoLimits(max_expressions=2)
    with pytest.raises(ValueError, match="3 expressions: this demo takes at most 2"):
        segment_image(model, processor, str(shapes), "a\nb\nc", limits=limits)
    _, rows, _ = segment_image(model, processor, str(shapes), "a\nb", limits=limits)
    assert [r[0] for r in rows] == ["a", "b"]
    with pytest.raises(ValueError, match="max_expressions must be a positive integer, got 0"):
        DemoLimits(max_expressions=0)


def test_a_non_image_upload_gets_a_clear_message(tiny, tmp_path):
    model, processor = tiny
    notes = tmp_path / "notes.png"
    notes.write_text("these are my notes, not a picture")
    with pytest.raises(ImageLoadError, match=r"Cannot read image file .*notes.png.*UnidentifiedImageError"):
        segment_image(model, processor, str(notes), "the red circle")
    with pytest.raises(ImageLoadError, match="notes.png"):
        chat_turn(model, processor, str(notes), "Describe the image.", None)


def test_results_are_compact_and_match_segment(tiny, shapes):
    """The demo keeps bool masks only (no full-size float probabilities) and draws exactly what `model.segment`
    returns for the image as the CLI reads it."""
    model, processor = tiny
    expressions = ["the red circle", "the blue square"]
    image = load_image(shapes)
    compact = segment_compact(model, processor, image, expressions)
    full = model.segment(processor, image, expressions)
    assert compact.probabilities is None and full.probabilities is not None
    assert compact.masks.dtype == torch.bool and torch.equal(compact.masks, full.masks)
    overlay, rows, answer = segment_image(model, processor, str(shapes), "the red circle; the blue square")
    assert np.array_equal(np.asarray(overlay), np.asarray(draw_overlay(image, full, expressions)))
    assert answer == full.text and [r[0] for r in rows] == expressions


def test_uploads_are_read_in_the_viewers_frame(tiny, tmp_path):
    """A photo stored 60 wide x 30 high with EXIF Orientation 6 is shown 30 x 60: the overlay is too."""
    model, processor = tiny
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (60, 30), (200, 30, 30)).save(path, exif=exif)
    overlay, _, _ = segment_image(model, processor, str(path), "the red circle")
    assert overlay.size[0] == 30 and overlay.size[1] >= 60  # (a [REJ] strip may extend it below)


def test_chat_turn_answers_like_model_chat(tiny, shapes):
    model, processor = tiny
    answer, history = chat_turn(model, processor, str(shapes), "Describe the image.", None, max_new_tokens=4)
    pixels = processor.image_processor(load_image(shapes), tiling="dynamic")["pixel_values"]
    with torch.inference_mode():
        expected = model.chat(processor.tokenizer, pixels, "Describe the image.",
                              dict(max_new_tokens=4, do_sample=False))
    assert answer == expected and history[-1][1] == expected


def test_title_comes_from_the_model(tiny, tmp_path):
    model, _ = tiny
    final = tmp_path / "mllmseg-quickstart" / "run" / "final"
    final.mkdir(parents=True)
    assert model_title(model, str(final)) == "mllmseg-quickstart"  # not "final"
    (final / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# MLLMSeg tiny shapes\n\nText.\n")
    assert model_title(model, str(final)) == "MLLMSeg tiny shapes"
    assert model_title(model, "someone/mllmseg-8b") == "someone/mllmseg-8b"  # a Hub id


def _gradio_components(demo):
    return {getattr(block, "elem_id", None): block for block in demo.blocks.values()}


def _post_upload(url: str, payload: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"photo.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    try:
        with opener.open(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_server_takes_file_paths_and_refuses_oversized_uploads(tiny, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from mllmseg.demo import build_demo, launch_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    model, processor = tiny
    limits = DemoLimits(max_file_size=4000)
    demo = build_demo(model, processor, limits=limits)
    try:
        components = _gradio_components(demo)
        assert components["segment-image"].type == "filepath" and components["chat-image"].type == "filepath"
        url = launch_app(demo, port=None, limits=limits)
        small = io.BytesIO()
        Image.new("RGB", (8, 8)).save(small, format="PNG")
        assert _post_upload(url, small.getvalue()) == 200
        assert _post_upload(url, small.getvalue() + b"\0" * 5000) == 413  # over max_file_size
    finally:
        demo.close()


def test_cli_demo_limit_flags_are_checked_in_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mllmseg"}))
    for flags, message in [(["--max-expressions", "0"], "--max-expressions must be >= 1, got 0"),
                           (["--max-pixels", "-5"], "--max-pixels must be >= 1, got -5"),
                           (["--max-file-size", "0"], "--max-file-size must be a positive number of MB, got 0.0")]:
        assert cli_main(["demo", str(model), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"mllmseg demo: error: {message}"], err


def test_the_demo_offers_examples_that_load_and_segment(tiny, tmp_path, monkeypatch):
    """The Segment tab's examples are synthetic scenes written at start (no download, nothing from tests/), with
    expressions of those very scenes; the Chat tab has example questions; the server serves the example images."""
    pytest.importorskip("gradio")
    from mllmseg.data.synthetic import SyntheticReferringDataset
    from mllmseg.demo import build_demo, launch_app, split_expressions
    from mllmseg.training.recipes import synthetic_scene_kwargs

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    model, processor = tiny
    demo = build_demo(model, processor, examples_dir=tmp_path / "examples")
    try:
        components = _gradio_components(demo)
        segment, chat = components["segment-examples"], components["chat-examples"]
        assert [type(c).__name__ for c in segment._components] == ["Image", "Textbox"]
        assert [type(c).__name__ for c in chat._components] == ["Image", "Textbox"]
        scenes = SyntheticReferringDataset(3, seed=0, split="demo", **synthetic_scene_kwargs("tiny_base"))
        raw = segment.raw_samples
        assert len(raw) == 3 and len(segment.samples) == 3
        categories = set()
        for k, (path, text) in enumerate(raw):
            assert path == str(tmp_path / "examples" / f"shapes_{k}.png")
            image = load_image(path)
            assert np.array_equal(np.asarray(image), np.asarray(scenes[k].image))  # the scene, losslessly
            expressions = split_expressions(text)
            assert expressions == [r.text for r in scenes[k].referents][:3]
            categories |= {r.category for r in scenes[k].referents[:3]}
            overlay, rows, answer = segment_image(model, processor, path, text)
            assert overlay.size[0] == 224 and [r[0] for r in rows] == expressions and isinstance(answer, str)
        assert len(categories) >= 3 and "no_target" in categories  # the examples also show [REJ]
        questions = [question for _, question in chat.raw_samples]
        assert questions == ["What shapes are in this image?", f"Please segment {split_expressions(raw[0][1])[0]}."]
        answer, _ = chat_turn(model, processor, chat.raw_samples[1][0], questions[1], None, max_new_tokens=4)
        assert isinstance(answer, str)

        url = launch_app(demo, port=None)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url.rstrip("/") + segment.samples[1][0]["url"], timeout=60) as response:
            served = Image.open(io.BytesIO(response.read()))
            assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(scenes[1].image))
    finally:
        demo.close()
