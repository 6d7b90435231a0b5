"""`mllmseg segment` with several images (`-e EXPRESSION` form), `--out-dir` / duplicate stems, the JSON's one entry
per image, and the shared `--device` / `--threads` / deprecated `--cpu` options: real `main` calls in one fresh
process against a saved tiny remote-code checkpoint, checked against `model.segment` run here on the reloaded
checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mllmseg.visualize import draw_overlay

from .conftest import REPO_ROOT
from .test_cli_segment_chat import DRIVER, check_one_line_error, make_image, reload, rle_decode, save_checkpoint

EXPRESSIONS = ["the red circle", "the blue square"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")


def second_image(path):
    """Another scene and size: the circle bottom right, the square top left."""
    image = Image.new("RGB", (240, 200), (90, 160, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((130, 90, 220, 180), fill=(200, 40, 40))
    draw.rectangle((20, 20, 100, 90), fill=(40, 40, 200))
    image.save(path)
    return image


def error_cases(c):
    """(argv, message the one-line error must contain)."""
    ckpt, a, b = c["ckpt"], c["a"], c["b"]
    cases = [
        (["segment", ckpt, a, c["dup"], "-e", "the dog"], "the same name stem 'a'"),
        (["segment", ckpt, a, b, "-e", "the dog", "--out", c["root"] / "x.png"], "use --out-dir"),
        (["segment", ckpt, "-e", "the dog"], "give at least one IMAGE"),
        (["segment", ckpt, a, "-e", " "], "is empty"),
        (["segment", ckpt, a, "the dog", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["segment", ckpt, a, "the dog", "--threads", "many"], "--threads must be a whole number"),
        (["segment", ckpt, a, "the dog", "--device", "gpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
        (["segment", ckpt, a, "the dog", "--cpu", "--device", "cuda"], "contradicts --device cuda"),
        (["chat", ckpt, a, "--threads", "-2"], "--threads must be >= 1"),
        (["evaluate", ckpt, "--dataset", "synthetic", "--device", "tpu"], "--device must be"),
        (["demo", ckpt, "--threads", "0"], "--threads must be >= 1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["segment", ckpt, a, "the dog", "--device", "cuda"], "no CUDA GPU is available"))
        cases.append((["chat", ckpt, a, "--device", "cuda:1"], "no CUDA GPU is available"))
    else:
        count = torch.cuda.device_count()
        cases.append((["segment", ckpt, a, "the dog", "--device", f"cuda:{count}"], f"has {count} CUDA device"))
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "other").mkdir()
    c = {"root": root, "ckpt": save_checkpoint(root / "ckpt"), "a": root / "a.png", "b": root / "b.png",
         "dup": root / "other" / "a.png", "out": root / "overlays", "json": root / "results.json",
         "one_json": root / "one.json", "one_out": root / "one"}
    c["pil_a"], c["pil_b"] = make_image(c["a"]), second_image(c["b"])
    make_image(c["dup"])
    cases = [
        # first, so the inter-op threads can still be set: several images, one batched call
        ["segment", c["ckpt"], c["a"], c["b"], "-e", EXPRESSIONS[0], "-e", EXPRESSIONS[1], "--out-dir", c["out"],
         "--json", c["json"], "--threads", "1", "--device", "cpu"],
        # positionals after the options, and the deprecated --cpu
        ["segment", c["ckpt"], "-e", EXPRESSIONS[0], c["b"], "--cpu", "--out-dir", c["one_out"], "--json",
         c["one_json"]],
    ] + [argv for argv, _ in error_cases(c)]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([list(map(str, a)) for a in cases])],
                          capture_output=True, text=True, env=ENV, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    return c, records


def test_several_images_in_one_call_give_one_entry_and_overlay_each(runs):
    c, records = runs
    run = records[0]
    assert run["code"] == 0, run["stderr"]
    assert run["threads"] == 1 and run["interop"] == 1  # --threads 1 reached torch
    payload = json.loads(c["json"].read_text())
    assert payload["expressions"] == EXPRESSIONS and payload["mode"] == "fast" and payload["tiling"] == "single"
    assert [e["image"] for e in payload["images"]] == [str(c["a"]), str(c["b"])]
    assert "results" not in payload  # several images: only the per-image entries
    assert sorted(p.name for p in c["out"].iterdir()) == ["a_overlay.png", "b_overlay.png"]

    model, processor = reload(c["ckpt"])
    images = [c["pil_a"], c["pil_b"]]
    batched = model.segment(processor, images, [EXPRESSIONS, EXPRESSIONS])
    for entry, image, expected, name in zip(payload["images"], images, batched, ["a", "b"]):
        assert entry["image_size"] == [image.width, image.height]
        assert entry["overlay"] == str(c["out"] / f"{name}_overlay.png")
        assert [r["expression"] for r in entry["results"]] == EXPRESSIONS
        for k, record in enumerate(entry["results"]):
            np.testing.assert_array_equal(rle_decode(record["rle"]), expected.masks[k].numpy())
            assert record["rejected"] is bool(expected.rejected[k])
            assert record["score"] == pytest.approx(float(expected.scores[k]), abs=1e-4)
        overlay = np.asarray(Image.open(entry["overlay"]).convert("RGB"))
        np.testing.assert_array_equal(overlay, np.asarray(draw_overlay(image, expected, EXPRESSIONS)))
        # the batch gives what one image alone gives
        alone = model.segment(processor, image, EXPRESSIONS)
        assert (alone.masks.numpy() != expected.masks.numpy()).mean() < 1e-3
    assert tuple(batched[0].masks.shape[1:]) == (240, 320) and tuple(batched[1].masks.shape[1:]) == (200, 240)
    assert f"{c['b']}: 'the red circle'" in run["stdout"] and "2 overlays in" in run["stdout"]


def test_one_image_with_e_after_the_options_and_the_deprecated_cpu(runs):
    c, records = runs
    run = records[1]
    assert run["code"] == 0, run["stderr"]
    payload = json.loads(c["one_json"].read_text())
    (entry,) = payload["images"]
    # one image: the entry's fields also at the top level, as before
    assert payload["image"] == entry["image"] == str(c["b"]) and payload["results"] == entry["results"]
    assert payload["image_size"] == [240, 200] and (c["one_out"] / "b_overlay.png").is_file()
    model, processor = reload(c["ckpt"])
    expected = model.segment(processor, c["pil_b"], EXPRESSIONS[:1])
    np.testing.assert_array_equal(rle_decode(entry["results"][0]["rle"]), expected.masks[0].numpy())


def test_bad_images_devices_and_threads_give_one_line_errors(runs):
    c, records = runs
    for (argv, message), record in zip(error_cases(c), records[2:]):
        assert record["argv"] == list(map(str, argv))
        check_one_line_error(argv[0], record["code"], record["stderr"], message)
        assert record["stdout"] == "", record


def test_device_resolution():
    from mllmseg.loading import parse_threads, resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device("CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto", cpu=True) == resolve_device("cpu", cpu=True) == "cpu"
    assert parse_threads(None) is None and parse_threads("3") == 3
    with pytest.raises(ValueError, match="cuda:N"):
        resolve_device("cuda:x")
