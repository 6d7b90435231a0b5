"""The README, followed as a new user follows it: every fenced bash / python / yaml block is run here as written,
or names the test that runs it, or says why it cannot run on this machine.

Each block (except `text` blocks: folder trees, sample output) is preceded by a marker comment (invisible on the rendered page):

* `<!-- walkthrough: run -->`, optionally `<!-- walkthrough: run; writes overlay.png result.json -->`: run in one
  walkthrough folder, in README order. Bash blocks run with `bash -e` (`mllmseg` on PATH is a shim for this interpreter's `python -m mllmseg`, offline);
  the python blocks run one after another in one fresh interpreter, sharing their names as a notebook would.
* `<!-- walkthrough: recipe -->`: a recipe file; it is written out and resolved with `mllmseg train FILE --print-recipe`
  (every key checked against what reads it).
* `<!-- walkthrough: elsewhere tests/test_x.py::test_y ... -- REASON -->`: too long for a walkthrough (a 10-minute
  quickstart, the suite itself, several processes) or needing data a user brings; the named tests (or `.ci/run`)
  run it, and they must exist.
* `<!-- walkthrough: not-run REASON -->`: cannot run here (a GPU, an install from the network, an upload).

The walkthrough folder holds what the README assumes a user has: the checkpoint `bash dev.sh quickstart` writes
(`mllmseg-quickstart/final`, here from a quickstart whose fine-tune is cut to 4 steps), two photos (`photo.jpg`, `photo.png`, from
scikit-image's data set) and a transformers-native InternVL base at `path/to/InternVL2_5-8B-hf` (tiny,
`InternVLForConditionalGeneration` from transformers itself).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- walkthrough: (run|recipe|elsewhere|not-run)\b(.*?)-->\s*$")
LANGUAGES = ("bash", "python", "yaml")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    kind: str | None
    detail: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, end = i, i + 1
        while not lines[end].startswith("```"):
            end += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous.strip())
        blocks.append(Block(start + 1, fence.group(1), "\n".join(lines[start + 1:end]) + "\n",
                            marker.group(1) if marker else None, marker.group(2).strip() if marker else ""))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def test_every_block_says_how_it_is_tested():
    assert len(BLOCKS) >= 15  # the parser found the README's blocks
    for block in BLOCKS:
        if block.lang == "text":  # folder trees and sample output: nothing to run
            assert block.kind is None, f"{block.where}: a text block is not run; drop its marker"
            continue
        assert block.lang in LANGUAGES, (f"{block.where}: a fenced block needs one of {LANGUAGES} (or `text` for "
                                         f"trees and output), got {block.lang!r}")
        assert block.kind is not None, f"{block.where}: no <!-- walkthrough: ... --> marker before this block"
        if block.kind == "not-run":
            assert len(block.detail) > 10, f"{block.where}: say why the block cannot run here"
        if block.kind == "recipe":
            assert block.lang == "yaml", block.where
        if block.kind == "run":
            assert block.lang in ("bash", "python"), block.where
        if block.kind == "elsewhere":
            named, _, reason = block.detail.partition(" -- ")
            assert named.split() and reason.strip(), (
                f"{block.where}: write `elsewhere tests/test_x.py::test_y [.ci/run] -- why not here`")
            for name in named.split():
                file, _, test = name.partition("::")
                assert (ROOT / file).is_file(), f"{block.where}: {file} not found"
                if test:
                    source = (ROOT / file).read_text(encoding="utf-8")
                    assert re.search(rf"^(async )?def {test}\(", source, re.M), f"{block.where}: {name} not found"


def _command_shims(folder: Path) -> Path:
    """`folder/bin/mllmseg`: this interpreter's `python -m mllmseg`, so the README's `mllmseg ...` runs in the
    environment under test (CI's overlay environments have no console scripts of their own)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "mllmseg"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mllmseg "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def _env(bin_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([*([str(bin_dir)] if bin_dir else []), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    return env


def _write_hf_base(folder: Path) -> None:
    """A tiny transformers-native InternVL (`InternVLForConditionalGeneration`, no [SEG]) with its tokenizer."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from mllmseg.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(with_seg_tokens=False)
    config = InternVLConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                           image_size=112, patch_size=14),
        text_config=dict(model_type="qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=len(tokenizer),
                         tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    folder = tmp_path_factory.mktemp("walkthrough")
    Image.fromarray(skimage_data.chelsea()).save(folder / "photo.jpg", quality=90)  # 451 x 300, one tile
    Image.fromarray(skimage_data.astronaut()).save(folder / "photo.png")  # 512 x 512
    _write_hf_base(folder / "path" / "to" / "InternVL2_5-8B-hf")
    # What `bash dev.sh quickstart` leaves behind, in its layout (its fine-tune shortened from 600 steps to 4).
    subprocess.run([sys.executable, "-m", "mllmseg", "quickstart", "--steps", "4", "--eval-images", "2",
                    "--concept-images", "2", "--train-images", "8", "--overlays", "1", "training.save_steps=2"],
                   cwd=folder, env=_env(), check=True, capture_output=True, text=True)
    assert (folder / "mllmseg-quickstart" / "final" / "config.json").is_file()
    return folder


def _check(result: subprocess.CompletedProcess, block: str) -> None:
    assert result.returncode == 0, (f"{block} failed (exit {result.returncode}):\n--- stdout\n{result.stdout[-4000:]}"
                                    f"\n--- stderr\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run" and b.lang == "bash"],
                         ids=lambda b: b.where)
def test_bash_block_runs_as_written(walkthrough, block):
    writes = block.detail.split("writes", 1)[1].split() if "writes" in block.detail else []
    for name in writes:
        (walkthrough / name).unlink(missing_ok=True)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=walkthrough,
                            env=_env(_command_shims(walkthrough)),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    _check(result, block.where)
    for name in writes:
        assert (walkthrough / name).is_file(), f"{block.where} should write {name}"


def test_python_blocks_run_in_order(walkthrough):
    blocks = [b for b in BLOCKS if b.kind == "run" and b.lang == "python"]
    assert blocks
    # Each block is compiled under its README line so a traceback points at the README.
    script = "import sys\nnamespace = {'__name__': '__main__'}\n" + "".join(
        f"exec(compile({b.code!r}, {b.where!r}, 'exec'), namespace)\nprint('ran', {b.where!r}, flush=True)\n"
        for b in blocks)
    result = subprocess.run([sys.executable, "-c", script], cwd=walkthrough, env=_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=900)
    _check(result, "the README's python blocks")
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ran ")] == [b.where for b in blocks]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "recipe"], ids=lambda b: b.where)
def test_recipe_block_resolves(tmp_path, block):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(block.code, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "mllmseg", "train", str(recipe), "--print-recipe"], cwd=tmp_path,
                            env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    _check(result, block.where)
