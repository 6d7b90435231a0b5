"""The web demo in a real browser: `python -m mllmseg demo` runs in a subprocess on a free loopback port, headless
Debian Chromium (driven by Playwright, no downloaded browser) uploads an image, types expressions, submits and
reads the page; the screenshot's overlay pixels are checked against the model's own prediction, computed here
with `model.segment` on the same checkpoint.

Needs /usr/bin/chromium (`apt-get install -y chromium chromium-driver`), playwright and gradio (`pip install -e
'.[test]'`). Without them the tests skip, unless MLLMSEG_REQUIRE_BROWSER=1 (CI sets it), where they fail.
MLLMSEG_UPDATE_SCREENSHOT=1 also writes the Segment tab's screenshot to docs/demo.png (the README's picture).
"""
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from mllmseg.visualize import blend, draw_overlay, mask_color

from .conftest import REPO_ROOT
from .test_cli_segment_chat import make_image, reload, save_checkpoint

CHROMIUM = os.environ.get("MLLMSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPRESSIONS = ["the red circle", "the blue square"]
CHAT_TOKENS = 8
# Upper bounds for things that normally take seconds; they only keep a broken run from hanging, nothing is
# asserted about how long anything takes.
SERVER_START_LIMIT_S = 240
PAGE_LIMIT_MS = 180_000


def missing_requirements() -> list[str]:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium chromium-driver)")
    for module in ("playwright", "gradio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {module} (pip install -e '.[test]')")
    return missing


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    missing = missing_requirements()
    if missing:
        reason = "the browser test needs " + ", ".join(missing)
        if os.environ.get("MLLMSEG_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (MLLMSEG_REQUIRE_BROWSER=1)")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + SERVER_START_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the demo did not answer at {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser_available):
    root = tmp_path_factory.mktemp("demo")
    image = make_image(root / "shapes.png")
    checkpoint = save_checkpoint(root / "tiny-random-model", "blocky", image=image)
    port = free_port()
    log = root / "demo.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO_ROOT),
               GRADIO_TEMP_DIR=str(root / "gradio"))
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mllmseg", "demo", str(checkpoint), "--port", str(port),
             "--max-new-tokens", str(CHAT_TOKENS)],
            stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield {"url": url, "checkpoint": checkpoint, "image_path": root / "shapes.png", "image": image, "root": root,
               "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def model_and_processor(server):
    return reload(server["checkpoint"])


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    """One headless Chromium with a fresh profile for the module; each test gets its own page."""
    from playwright.sync_api import sync_playwright

    outside = []  # every request that would leave this machine (the demo must not make any)

    def route(route_):
        url = route_.request.url
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname in ("127.0.0.1", "localhost"):
            route_.continue_()
        else:
            outside.append(url)
            route_.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 860}, device_scale_factor=1)
        context.set_default_timeout(PAGE_LIMIT_MS)
        context.route("**/*", route)
        try:
            yield context, outside
        finally:
            context.close()


@pytest.fixture()
def page(server, browser):
    context, outside = browser
    page = context.new_page()
    page.goto(server["url"])
    yield page
    page.close()
    assert outside == [], f"the demo page requested outside resources: {outside}"


def displayed_image_box(page, selector: str) -> dict:
    """Where the browser painted the image's pixels: the element box, the natural size and object-fit/position
    (Gradio shows images with object-fit, so the element can be larger than the painted picture)."""
    return page.evaluate(
        """(selector) => {
            const img = document.querySelector(selector);
            const r = img.getBoundingClientRect();
            const s = getComputedStyle(img);
            return {x: r.x, y: r.y, width: r.width, height: r.height, natural_width: img.naturalWidth,
                    natural_height: img.naturalHeight, fit: s.objectFit, position: s.objectPosition};
        }""",
        selector,
    )


def painted_rect(box: dict) -> tuple[float, float, float]:
    """(left, top, scale) of the painted picture in page pixels."""
    nw, nh, w, h = box["natural_width"], box["natural_height"], box["width"], box["height"]
    if box["fit"] in ("contain", "scale-down"):
        scale = min(w / nw, h / nh)
        if box["fit"] == "scale-down":
            scale = min(scale, 1.0)
    elif box["fit"] in ("fill", "none"):
        assert box["fit"] == "none" or abs(w / nw - h / nh) < 1e-6, box
        scale = 1.0 if box["fit"] == "none" else w / nw
    else:
        pytest.fail(f"unexpected object-fit {box['fit']!r}")
    assert box["position"] in ("50% 50%", "center center", "center"), box
    return box["x"] + (w - nw * scale) / 2, box["y"] + (h - nh * scale) / 2, scale


def wait_until_shown(page, component: str) -> None:
    """Until the component's image is loaded and fully painted: Gradio dims a pending output with a translucent
    status layer and fades it, so a screenshot taken earlier shows the overlay mixed with white."""
    page.wait_for_function(
        """(id) => {
            const root = document.getElementById(id);
            const img = root && root.querySelector('img');
            if (!img || !img.complete || img.naturalWidth === 0) return false;
            const tracker = root.querySelector('[data-testid="status-tracker"]');
            if (tracker && !tracker.classList.contains('hide')) return false;
            for (let el = img; el; el = el.parentElement) {
                if (parseFloat(getComputedStyle(el).opacity) < 1) return false;
            }
            return true;
        }""",
        arg=component,
    )


def upload(page, component: str, path: Path) -> None:
    page.locator(f"#{component} input[type=file]").set_input_files(str(path))
    page.locator(f"#{component} img").first.wait_for()  # the preview: the upload reached the server


def test_segment_tab_shows_the_models_masks(server, model_and_processor, page, tmp_path):
    upload(page, "segment-image", server["image_path"])
    page.locator("#segment-text textarea").fill(" ; ".join(EXPRESSIONS))  # ';' separates expressions
    page.locator("#segment-button").click()
    page.locator("#segment-table", has_text=EXPRESSIONS[1]).wait_for()
    wait_until_shown(page, "segment-overlay")
    screenshot = page.screenshot(animations="disabled")
    if os.environ.get("MLLMSEG_UPDATE_SCREENSHOT") == "1":
        save_docs_screenshot(screenshot, REPO_ROOT / "docs" / "demo.png")

    model, processor = model_and_processor
    source_image = server["image"]
    expected = model.segment(processor, source_image, EXPRESSIONS)
    masks = expected.masks.numpy()
    assert not expected.rejected.any() and 0.05 < masks[0].mean() < 0.95  # a partial mask: something to see

    # The table: one row per expression with the model's box, score and [REJ] flag.
    table = page.locator("#segment-table").inner_text()
    for k, expression in enumerate(EXPRESSIONS):
        assert expression in table
        assert ", ".join(str(int(v)) for v in expected.boxes[k]) in table
        assert str(round(float(expected.scores[k]), 3)) in table
    assert "yes" not in table

    # The screenshot: map every page pixel of the painted overlay back to the image.
    box = displayed_image_box(page, "#segment-overlay img")
    assert (box["natural_width"], box["natural_height"]) == source_image.size  # nothing rejected: no strip
    left, top, scale = painted_rect(box)
    shot = np.asarray(Image.open(io.BytesIO(screenshot)).convert("RGB")).astype(int)
    source = np.asarray(source_image).astype(int)
    full = np.asarray(draw_overlay(source_image, expected, EXPRESSIONS)).astype(int)
    plain = np.asarray(draw_overlay(source_image, expected, EXPRESSIONS, boxes=False, labels=False)).astype(int)
    # Only sample where resampling cannot mix colours and no box line or label covers the mask: the image pixel's
    # neighbourhood has one mask state for every expression and no drawing.
    radius = int(np.ceil(1 / scale)) + 1
    state = masks[0].astype(int) + 2 * masks[1].astype(int)
    clean = (full == plain).all(-1)
    h, w = state.shape
    ys, xs = np.mgrid[int(np.ceil(top)) : int(top + h * scale), int(np.ceil(left)) : int(left + w * scale)]
    iy = np.clip(((ys + 0.5 - top) / scale).astype(int), 0, h - 1)
    ix = np.clip(((xs + 0.5 - left) / scale).astype(int), 0, w - 1)
    pad_state = np.pad(state, radius, constant_values=-1)
    pad_clean = np.pad(clean, radius, constant_values=False)
    uniform = np.ones_like(iy, dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            uniform &= pad_state[iy + dy + radius, ix + dx + radius] == state[iy, ix]
            uniform &= pad_clean[iy + dy + radius, ix + dx + radius]
    seen = shot[ys, xs]

    def close(a, b, tolerance=6):
        return (np.abs(a - b) <= tolerance).all(-1)

    once = blend(source, mask_color(0)).astype(int)
    checks = {
        # state: (expected colour at the image pixel, colour it must not be)
        3: (blend(once, mask_color(1)).astype(int), source),  # both masks: the second colour over the first
        1: (once, source),  # the first expression's mask only
        0: (source, once),  # no mask: the image itself
    }
    for value, (colour, other) in checks.items():
        where = uniform & (state[iy, ix] == value)
        assert where.sum() > 200, f"too few clean samples of state {value}: {where.sum()}"
        want, avoid = colour[iy[where], ix[where]], other[iy[where], ix[where]]
        assert close(seen[where], want).mean() > 0.99, (value, seen[where][:5], want[:5])
        assert not close(seen[where], avoid).any(), value

    # The answer text of the teacher-forced forward.
    assert page.locator("#segment-answer textarea").input_value() == expected.text


def test_segment_tab_reports_bad_input_in_the_page(server, page):
    upload(page, "segment-image", server["image_path"])
    page.locator("#segment-text textarea").fill(" ;  ; ")  # no expression at all
    page.locator("#segment-button").click()
    page.get_by_text("type at least one expression").first.wait_for()


def test_chat_tab_keeps_the_conversation(server, model_and_processor, page):
    page.get_by_role("tab", name="Chat").click()
    upload(page, "chat-image", server["image_path"])
    questions = ["Describe the image.", "What colour is the circle?"]
    for turn, question in enumerate(questions, start=1):
        page.locator("#chat-question textarea").fill(question)
        page.locator("#chat-send").click()
        page.locator('#chat-log [data-testid="bot"]').nth(turn - 1).wait_for()
    users = [t.strip() for t in page.locator('#chat-log [data-testid="user"]').all_inner_texts()]
    bots = [" ".join(t.split()) for t in page.locator('#chat-log [data-testid="bot"]').all_inner_texts()]
    assert users == questions

    # The same conversation in-process, history carried over: the page shows the same answers.
    model, processor = model_and_processor
    pixel_values = processor.image_processor(server["image"], tiling="dynamic")["pixel_values"]
    config = dict(max_new_tokens=CHAT_TOKENS, do_sample=False)
    history, answers = None, []
    for question in questions:
        answer, history = model.chat(processor.tokenizer, pixel_values, question, config, history=history,
                                     return_history=True)
        answers.append(" ".join(answer.split()))
    assert bots == answers


def save_docs_screenshot(png: bytes, path: Path) -> None:
    """The README's picture: the page cropped to its content and stored with a palette (a fraction of the size)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = np.asarray(image)
    rows = np.nonzero((pixels != pixels[-1, -1]).any(-1).any(-1))[0]
    image = image.crop((0, 0, image.width, min(image.height, int(rows.max()) + 16)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
