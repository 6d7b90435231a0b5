"""`mllmseg segment` / `chat` / `--help` / bad arguments, run as real `python -m mllmseg` subprocesses against
saved remote-code checkpoints, checked against `model.segment` run in this process on the reloaded checkpoint."""
import functools
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.visualize import blend, draw_overlay, mask_color, mask_outline

from .conftest import REPO_ROOT


def make_blocky(model, processor, image) -> None:
    """Make a random tiny model predict blocky masks: every one of the decoder's P*P pixel-shuffle channels gets the
    weights of channel 0 and the final 5x5 conv becomes the identity, so each ViT patch's mask is one constant
    block. A random decoder predicts pixel-level noise, which no screenshot or overlay check could sample; blocks
    keep the prediction the model's own (image- and expression-dependent) but readable. The final bias is then set
    to minus the median logit on `image`, so about half of that image is masked (the ReLU before it makes every
    logit >= 0, which would mask everything)."""
    conv, norm = model.mask_decoder.conv1[0], model.mask_decoder.conv1[1]
    conv2 = model.mask_decoder.conv2
    with torch.no_grad():
        conv.weight.copy_(conv.weight[:1].expand_as(conv.weight))
        conv.bias.fill_(float(conv.bias[0]))
        for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
            tensor.fill_(float(tensor[0]))
        conv2.weight.zero_()
        conv2.weight[0, 0, 2, 2] = 1.0
        conv2.bias.zero_()
        probs = model.segment(processor, image, "the red circle").probabilities[0].double()
        conv2.bias.fill_(-float(torch.log(probs / (1 - probs)).median()))


def make_rejecting(model) -> None:
    """Make the model answer [REJ] at every slot: a large constant in channel 0 of every token embedding survives the
    two tiny layers, so after the final RMSNorm channel 0 is ~+sqrt(width) everywhere, and the [REJ] row of lm_head
    reads only that channel."""
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, 0] = 1000.0
        model.lm_head.weight[model.config.rej_token_id].zero_()
        model.lm_head.weight[model.config.rej_token_id, 0] = 50.0


def save_checkpoint(folder, kind: str = "blocky", seed: int = 0, image=None):
    """A tiny remote-code checkpoint (model + processor) in `folder`; kind "blocky" (calibrated on `image`, default
    `make_image()`) or "rejecting"."""
    model, tokenizer = build_tiny_model(seed=seed)
    processor = build_processor(tokenizer, model.config)
    if kind == "blocky":
        make_blocky(model, processor, image if image is not None else make_image())
    else:
        make_rejecting(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_image(path=None, size=(320, 240)):
    """Flat grey with two shapes: flat colours make every overlay pixel predictable."""
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 140, 140), fill=(200, 40, 40))
    draw.rectangle((180, 100, 300, 220), fill=(40, 40, 200))
    if path is not None:
        image.save(path)
    return image


@functools.lru_cache(maxsize=4)
def reload(folder):
    """The checkpoint as the CLI loads it: AutoModel/AutoProcessor with trust_remote_code=True (loaded once per
    folder: the tests only run it)."""
    from transformers import AutoModel, AutoProcessor

    return (AutoModel.from_pretrained(folder, trust_remote_code=True).eval(),
            AutoProcessor.from_pretrained(folder, trust_remote_code=True))


def rle_decode(rle) -> np.ndarray:
    """COCO RLE (compressed string counts, column-major) -> (h, w) bool, decoded by hand so the check does not
    reuse the encoder's library."""
    h, w = rle["size"]
    s, counts, i = rle["counts"], [], 0
    while i < len(s):  # COCO's LEB128-like string: 5 data bits per char, sign in bit 5 of the last char
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i, k = i + 1, k + 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for n in counts:
        flat[pos : pos + n] = value
        pos, value = pos + n, not value
    assert pos == h * w, (pos, h * w)
    return flat.reshape(w, h).T


# Every `python -m mllmseg` start costs seconds of imports on a 2-core machine, so the module starts all its CLI
# processes at once (the `runs` fixture) and the tests then read their results.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))


def start(argv, stdin=None, cwd=None, module=True):
    command = [sys.executable, "-m", "mllmseg", *map(str, argv)] if module else [sys.executable, *map(str, argv)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=cwd, env=ENV)
    return process, stdin or ""


def finish(started) -> dict:
    """Wait for every process (input sent, outputs read concurrently by communicate) -> CompletedProcess each."""
    done = {}
    for name, (process, stdin) in started.items():
        stdout, stderr = process.communicate(stdin)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


# --help and the user errors of every command in one process, calling the `main` of `python -m mllmseg` once per
# case, each case's output and exit code recorded apart.
# Runs `main(argv)` for each case (argv lists as JSON in argv[1]) in one process, in order, and prints one JSON list:
# each case's exit code, stdout, stderr and torch's thread counts after it (for --threads). Shared by the CLI tests.
DRIVER = """
import contextlib, io, json, sys
import torch
from mllmseg.cli import main
records = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse: --help and usage errors
            code = exit.code
    records.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads()})
print(json.dumps(records))
"""


def command_names():
    from mllmseg.cli import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return list(action.choices)


CHAT_QUESTIONS = ["Describe the image.", "", "What colour is the circle?"]  # then end of input


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    blocky = save_checkpoint(root / "blocky", "blocky")
    rejecting = save_checkpoint(root / "rejecting", "rejecting")
    image = make_image(root / "shapes.png")
    not_an_image = root / "notes.png"
    not_an_image.write_text("not a png")
    work = root / "work"  # an empty current folder: no quickstart checkpoint for `demo` to find
    work.mkdir()
    return {"blocky": blocky, "rejecting": rejecting, "image": root / "shapes.png", "pil": image, "root": root,
            "not_an_image": not_an_image, "work": work}


def bad_argument_cases(c):
    """(argv, the message the one-line error must contain)."""
    missing = c["root"] / "missing-model"
    return [
        (("segment", missing, c["image"], "the dog"), "model folder not found"),
        (("segment", c["blocky"], c["root"] / "missing.png", "the dog"), "image not found"),
        (("segment", c["blocky"], c["not_an_image"], "the dog"), "Cannot read image file"),
        (("segment", c["blocky"], c["image"]), "give at least one EXPRESSION"),
        (("segment", c["blocky"], c["image"], "  "), "is empty"),
        (("segment", c["blocky"], c["image"], "the dog", "--threshold", "2"), "--threshold"),
        (("segment", c["blocky"], c["image"], "the dog", "--out", c["root"] / "o.jpg"), "--out must be a .png"),
        (("segment", c["root"], c["image"], "the dog"), "no config.json"),
        (("segment", c["image"], c["image"], "the dog"), "got a file"),
        (("chat", missing, c["image"]), "model folder not found"),
        (("chat", c["blocky"], c["not_an_image"]), "Cannot read image file"),
        (("chat", c["blocky"], c["root"]), "image not found"),
        (("demo", missing), "model folder not found"),
        (("demo",), "bash dev.sh quickstart"),  # no MODEL, no quickstart checkpoint here: say how to make one
    ]


@pytest.fixture(scope="module")
def runs(checkpoints):
    c = checkpoints
    out = c["root"] / "out"
    driver_cases = [[name, "--help"] for name in command_names()] + [["--help"]]
    driver_cases += [list(map(str, argv)) for argv, _ in bad_argument_cases(c)]
    started = {
        "segment": start(["segment", c["blocky"], c["image"], "the red circle", "the blue square",
                          "--out", out / "overlay.png", "--json", out / "result.json"]),
        "rejected": start(["segment", c["rejecting"], c["image"], "a unicorn", "the dog", "--out", out / "rej.png",
                           "--json", out / "rej.json", "--tiling", "dynamic"]),
        "chat": start(["chat", c["blocky"], c["image"], "--max-new-tokens", "6"],
                      stdin="\n".join(CHAT_QUESTIONS) + "\n"),
        # One user error through `python -m mllmseg` itself, as a user types it; the rest through the driver.
        "bad": start(["segment", c["blocky"], c["not_an_image"], "the dog"], cwd=c["work"]),
        "driver": start(["-c", DRIVER, json.dumps(driver_cases)], cwd=c["work"], module=False),
    }
    done = finish(started)
    assert done["driver"].returncode == 0, done["driver"].stderr
    records = json.loads(done["driver"].stdout.strip().splitlines()[-1])
    return dict(done, out=out, records={tuple(r["argv"]): r for r in records})


def test_segment_writes_json_and_overlay_matching_the_model(checkpoints, runs):
    expressions = ["the red circle", "the blue square"]
    out, js = runs["out"] / "overlay.png", runs["out"] / "result.json"
    run = runs["segment"]
    assert run.returncode == 0, run.stderr
    assert "overlay:" in run.stdout and "'the red circle': box" in run.stdout

    model, processor = reload(checkpoints["blocky"])
    expected = model.segment(processor, checkpoints["pil"], expressions)
    masks = expected.masks.numpy()
    assert not expected.rejected.any()
    assert 0.05 < masks[0].mean() < 0.95, "the blocky tiny model should predict a partial mask on this image"

    payload = json.loads(js.read_text())
    assert payload["image_size"] == [320, 240] and payload["mode"] == "fast" and payload["tiling"] == "single"
    assert [r["expression"] for r in payload["results"]] == expressions
    for k, record in enumerate(payload["results"]):
        assert record["rle"]["size"] == [240, 320]
        np.testing.assert_array_equal(rle_decode(record["rle"]), masks[k])
        assert record["box"] == [int(v) for v in expected.boxes[k]]
        ys, xs = np.nonzero(masks[k])
        assert record["box"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert record["rejected"] is False and record["area"] == int(masks[k].sum())
        assert record["score"] == pytest.approx(float(expected.scores[k]), abs=1e-4)

    # Overlay: exactly the shared drawing of the in-process result (same size: nothing rejected, no strip) ...
    overlay = np.asarray(Image.open(out).convert("RGB"))
    source = np.asarray(checkpoints["pil"])
    np.testing.assert_array_equal(overlay, np.asarray(draw_overlay(checkpoints["pil"], expected, expressions)))
    # ... whose mask pixels carry the blend of the image and each mask's colour (the second blended on top of the
    # first where they overlap) and whose other pixels are the image, boxes and labels aside ...
    plain = np.asarray(draw_overlay(checkpoints["pil"], expected, expressions, boxes=False, labels=False))
    once = blend(source, mask_color(0))
    # every mask's outline in its own full colour (the later one's drawn last), so a covered mask stays visible
    edge0, edge1 = mask_outline(masks[0]), mask_outline(masks[1])
    assert (plain[edge1] == mask_color(1)).all() and (plain[edge0 & ~edge1] == mask_color(0)).all()
    inside = ~(edge0 | edge1)
    only0, only1 = masks[0] & ~masks[1] & inside, masks[1] & ~masks[0] & inside
    both, neither = masks[0] & masks[1] & inside, ~masks[0] & ~masks[1]
    assert both.sum() > 1000 and neither.sum() > 1000
    np.testing.assert_array_equal(plain[both], blend(once, mask_color(1))[both])
    np.testing.assert_array_equal(plain[only0], once[only0])
    np.testing.assert_array_equal(plain[only1], blend(source, mask_color(1))[only1])
    np.testing.assert_array_equal(plain[neither], source[neither])
    # ... and, boxes and labels included, most mask pixels are mask-coloured and most others untouched.
    assert (overlay[both] == blend(once, mask_color(1))[both]).all(-1).mean() > 0.8
    assert (overlay[neither] == source[neither]).all(-1).mean() > 0.8
    x0, y0, x1, y1 = payload["results"][1]["box"]  # the last box drawn: its outline is in its colour
    assert (overlay[y1, x0 + 20 : x1 - 20] == mask_color(1)).all()


def test_segment_reports_rejected_expressions(checkpoints, runs):
    out, js = runs["out"] / "rej.png", runs["out"] / "rej.json"
    run = runs["rejected"]
    assert run.returncode == 0, run.stderr
    assert "'a unicorn': [REJ] not found" in run.stdout
    model, processor = reload(checkpoints["rejecting"])
    expected = model.segment(processor, checkpoints["pil"], ["a unicorn", "the dog"], tiling="dynamic")
    assert expected.rejected.all()
    payload = json.loads(js.read_text())
    assert payload["tiling"] == "dynamic"
    for record in payload["results"]:
        assert record["rejected"] is True and record["box"] is None and record["area"] == 0
        assert not rle_decode(record["rle"]).any()
    # Nothing drawn on the image; the rejected expressions are listed in a strip below it.
    overlay = np.asarray(Image.open(out).convert("RGB"))
    source = np.asarray(checkpoints["pil"])
    assert overlay.shape[0] > source.shape[0] and overlay.shape[1] == source.shape[1]
    np.testing.assert_array_equal(overlay[: source.shape[0]], source)
    assert (overlay[source.shape[0] :] != overlay[source.shape[0], 0]).any(), "the strip should carry text"


def test_chat_keeps_history_over_piped_questions(checkpoints, runs):
    run = runs["chat"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line for line in lines if line.startswith("user: ")] == [
        "user: Describe the image.", "user: What colour is the circle?"]
    answers = [line[len("assistant: "):] for line in lines if line.startswith("assistant: ")]
    assert len(answers) == 2 and lines[-1] == "(2 turns)"

    # The same two turns in-process, with the history carried over, give the same answers.
    model, processor = reload(checkpoints["blocky"])
    image = Image.open(checkpoints["image"]).convert("RGB")
    pixel_values = processor.image_processor(image, tiling="dynamic")["pixel_values"]
    config = dict(max_new_tokens=6, do_sample=False)
    first, history = model.chat(processor.tokenizer, pixel_values, "Describe the image.", config,
                                history=None, return_history=True)
    second, history = model.chat(processor.tokenizer, pixel_values, "What colour is the circle?", config,
                                 history=history, return_history=True)
    # The whole transcript, so an answer spanning lines would be compared whole too.
    assert run.stdout == (f"user: Describe the image.\nassistant: {first}\n"
                          f"user: What colour is the circle?\nassistant: {second}\n(2 turns)\n")
    assert [q for q, _ in history] == ["<image>\nDescribe the image.", "What colour is the circle?"]


def test_chat_questions_stop_at_an_exit_line():
    from mllmseg.commands.chat import questions

    stream = io.StringIO("first\n\n  second  \nEXIT\nnever asked\n")
    assert list(questions(stream, interactive=False)) == ["first", "second"]
    assert list(questions(io.StringIO("only\n"), interactive=False)) == ["only"]  # end of input ends too


def test_help_works_for_every_command(runs):
    names = command_names()
    assert {"segment", "chat", "demo", "quickstart", "evaluate"} <= set(names)
    for argv in [(name, "--help") for name in names] + [("--help",)]:
        record = runs["records"][argv]
        assert record["code"] == 0, record
        assert record["stdout"].startswith("usage: mllmseg") and record["stderr"] == "", record
    segment_help = runs["records"][("segment", "--help")]["stdout"]
    assert "--tiling {single,dynamic}" in segment_help and "EXPRESSION" in segment_help


def check_one_line_error(command, code, stderr, message):
    assert code == 2, (command, stderr)
    assert "Traceback" not in stderr, (command, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mllmseg {command}: error: "), (command, stderr)
    assert message in lines[0], (command, lines[0])


def test_bad_arguments_give_one_line_errors(checkpoints, runs):
    run = runs["bad"]  # through `python -m mllmseg`
    check_one_line_error("segment", run.returncode, run.stderr, "Cannot read image file")
    assert run.stdout == ""
    for argv, message in bad_argument_cases(checkpoints):
        record = runs["records"][tuple(map(str, argv))]
        check_one_line_error(argv[0], record["code"], record["stderr"], message)
