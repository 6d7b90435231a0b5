"""Every CLI mistake ends in one line on stderr and exit code 2: recipe syntax, recipe keys, inherited data-source
keys, pickle refusals. Each case runs the real `python -m mllmseg` in a fresh process."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO))
FAST = [
    "model.tiny.image_size=56", "model.tiny.vision_width=32", "model.tiny.text_width=32",
    "data.train.image_size=[56,56]", "training.per_device_train_batch_size=2", "training.logging_steps=1",
    "training.warmup_steps=0", "training.disable_tqdm=true",
]


def _mllmseg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mllmseg", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=cwd)


def _one_line_error(proc, command):
    """The process failed as a user mistake: exit code 2 and a single stderr line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mllmseg {command}: error: ")
    return lines[0]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("base: tiny\ntraining:\n  max_steps: 5\n    learning_rate: 1.0e-4\n")  # over-indented
    line = _one_line_error(_mllmseg("train", recipe, "--print-recipe"), "train")
    assert str(recipe) in line and "line 4, column 18" in line and "mapping values are not allowed here" in line


def test_override_with_a_yaml_syntax_error_is_named(tmp_path):
    line = _one_line_error(_mllmseg("train", "tiny", "data.train.image_size=[56,", "--print-recipe"), "train")
    assert "data.train.image_size=[56," in line


@pytest.mark.parametrize("override, key, suggestion", [
    ("training.max_step=5", "training.max_step", "training.max_steps"),
    ("model.tiny.text_widht=48", "model.tiny.text_widht", "model.tiny.text_width"),
    ("data.max_expresions=3", "data.max_expresions", "data.max_expressions"),
    ("lora.alpah=8", "lora.alpah", "lora.alpha"),
])
def test_unknown_override_key_names_it_and_suggests_the_closest(override, key, suggestion):
    """`training.max_step=5` used to be a TypeError traceback from TrainingArguments."""
    line = _one_line_error(_mllmseg("train", "tiny", override, "--print-recipe"), "train")
    assert f"'{key}'" in line and f"did you mean '{suggestion}'" in line and override in line


def test_base_recipe_data_source_of_another_type_does_not_inherit_keys(tmp_path):
    """A `base: tiny` recipe with a refer source used to inherit the synthetic source's `num_images`
    (TypeError: unexpected keyword argument)."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"base: tiny\ndata:\n  train: {{type: refer, data_root: {tmp_path / 'nowhere'}, "
                      "dataset: refcocog, split: train}\n")
    shown = _mllmseg("train", recipe, "--print-recipe")
    assert shown.returncode == 0, shown.stderr
    assert "num_images" not in shown.stdout and "type: refer" in shown.stdout
    line = _one_line_error(_mllmseg("train", recipe, "--output-dir", tmp_path / "out", *FAST[:3]), "train")
    assert "dataset folder not found" in line and str(tmp_path / "nowhere" / "refcocog") in line

    recipe.write_text("base: tiny\ndata:\n  train: {type: refer, data_root: x, dataset: refcocog, num_image: 3}\n")
    line = _one_line_error(_mllmseg("train", recipe, "--print-recipe"), "train")
    assert "'data.train.num_image'" in line and "refer" in line and "data_root" in line


def test_unsafe_refs_pickle_is_refused_in_one_line(tmp_path, fixtures_dir):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "data" / "refcocog"
    folder.mkdir(parents=True)
    shutil.copy(fixtures_dir / "refcocog_umd_mini" / "instances.json", folder / "instances.json")
    with open(folder / "refs(umd).p", "wb") as f:
        pickle.dump([{"ref_id": 1, "payload": Boom()}], f)
    line = _one_line_error(_mllmseg("evaluate", tmp_path, "--dataset", "refcocog",
                                    "--data-root", tmp_path / "data"), "evaluate")
    assert str(folder / "refs(umd).p") in line and "system" in line
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_pickle_refused_by_torch_is_one_line_naming_the_file(tmp_path):
    """torch.load(weights_only=True) refusing a checkpoint file used to end a multi-line traceback with torch's hint
    to pass weights_only=False."""
    out = tmp_path / "run"
    first = _mllmseg("train", "tiny", "--output-dir", out, *FAST, "training.max_steps=2", "training.save_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    target = out / "checkpoint-2" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "hook": print}, target)
    resume = _mllmseg("train", "tiny", "--output-dir", out, *FAST, "training.max_steps=3", "training.save_steps=2")
    line = _one_line_error(resume, "train")
    assert str(target) in line and "print" in line and "not an allowed global" in line
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 2  # nothing was overwritten
