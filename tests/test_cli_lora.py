"""A LoRA run's `final/` (an adapter folder: adapter_config.json, no config.json) through the commands: our adapter
card instead of PEFT's boilerplate, the base stored relative to the adapter so a moved run still loads and merges,
`segment` / `chat` / `evaluate` loading it (base + adapter, merged in memory), `merge-lora --dtype`, and the
one-line error naming `mllmseg merge-lora` when the base is gone. One real (tiny, 2-step) LoRA training run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mllmseg.cli import main
from mllmseg.training.recipes import load_recipe
from mllmseg.training.trainer import run_training

from .conftest import REPO_ROOT
from .test_cli_segment_chat import DRIVER, check_one_line_error, make_image, rle_decode

FAST = [
    "model.tiny.image_size=56", "model.tiny.vision_width=32", "model.tiny.text_width=32",
    "data.train.image_size=[56,56]", "training.per_device_train_batch_size=2", "training.logging_steps=1",
    "training.warmup_steps=0", "training.dataloader_num_workers=0", "training.disable_tqdm=true",
]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1")
EXPRESSIONS = ["the red circle", "the blue square"]



@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run trained in one folder, then moved (base-model/ and final/ together) to another."""
    root = tmp_path_factory.mktemp("lora")
    recipe = load_recipe("tiny", FAST + ["training.max_steps=2", "training.save_strategy=no",
                                         "training.learning_rate=0.05", "lora={r: 4, alpha: 8, dropout: 0.0}"])
    run_training(recipe, output_dir=str(root / "trained" / "run"))
    moved = root / "elsewhere" / "run-copy"
    moved.parent.mkdir()
    shutil.move(root / "trained" / "run", moved)
    image = make_image(root / "shapes.png")
    out = root / "out"
    cases = [
        ["segment", moved / "final", root / "shapes.png", *EXPRESSIONS, "--out", out / "o.png", "--json",
         out / "o.json", "--device", "cpu"],
        ["chat", moved / "final", root / "shapes.png", "--max-new-tokens", "3"],
        ["evaluate", moved / "final", "--dataset", "synthetic", "--num-images", "2", "--image-size", "56",
         "--output-dir", out / "eval"],
        ["merge-lora", moved / "final", out / "merged", "--dtype", "bfloat16"],
    ]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([list(map(str, a)) for a in cases])],
                          capture_output=True, text=True, env=ENV, cwd=root, timeout=600, input="")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {r["argv"][0]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    for record in records.values():
        assert record["code"] == 0, record
    return {"root": root, "trained": root / "trained" / "run", "run": moved, "final": moved / "final",
            "image": image, "out": out, "records": records}


def test_adapter_card_replaces_peft_boilerplate(lora_run):
    final = lora_run["final"]
    card = (final / "README.md").read_text()
    assert "[More Information Needed]" not in card and "Model Card for Model ID" not in card
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "| r | 4 |" in card and "| alpha | 8 |" in card and "| dropout | 0.0 |" in card
    assert "`mask_decoder`, `language_model.norm`" in card
    assert "`language_model.embed_tokens` rows [" in card  # the [SEG]/[REJ] rows
    assert r"(?:down_proj\|gate_proj" in card  # the target regex, its '|' escaped for the table
    assert "`../base-model` (relative to this folder)" in card
    assert "mllmseg segment run/final" in card and "mllmseg merge-lora run/final" in card
    assert 'PeftModel.from_pretrained(base, "run/final")' in card


def test_base_is_stored_relative_to_the_adapter(lora_run):
    config = json.loads((lora_run["final"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../base-model"
    from mllmseg.training.merge import adapter_base_path, resolve_base_path, stored_base_path

    assert adapter_base_path(lora_run["final"]) == str(lora_run["run"] / "base-model")
    # absolute paths and Hub ids read as they are; a base outside the run folder is stored absolute
    assert resolve_base_path("/models/base", lora_run["final"]) == "/models/base"
    assert resolve_base_path("org/base", lora_run["final"]) == "org/base"
    assert stored_base_path("/models/base", "/runs/a/final", "/runs/a") == "/models/base"
    assert stored_base_path("/runs/a/base-model", "/runs/a/final", "/runs/a") == "../base-model"
    assert stored_base_path("org/base", "/runs/a/final", "/runs/a") == "org/base"


def test_segment_loads_the_moved_adapter_folder(lora_run):
    from transformers import AutoProcessor

    from mllmseg.training.merge import load_adapter_model

    record = lora_run["records"]["segment"]
    payload = json.loads((lora_run["out"] / "o.json").read_text())
    adapted = load_adapter_model(lora_run["final"]).merge_and_unload().eval()
    processor = AutoProcessor.from_pretrained(lora_run["final"], trust_remote_code=True)
    expected = adapted.segment(processor, lora_run["image"], EXPRESSIONS)
    for k, entry in enumerate(payload["results"]):
        np.testing.assert_array_equal(rle_decode(entry["rle"]), expected.masks[k].numpy())
        assert entry["score"] == pytest.approx(float(expected.scores[k]), abs=1e-4)
    assert "'the red circle'" in record["stdout"]
    # the adapter was applied: the base alone scores differently
    from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

    base = MLLMSegForConditionalGeneration.from_pretrained(lora_run["run"] / "base-model").eval()
    plain = base.segment(processor, lora_run["image"], EXPRESSIONS)
    assert np.abs(plain.scores.numpy() - expected.scores.numpy()).max() > 1e-4


def test_chat_and_evaluate_load_the_adapter_folder(lora_run):
    assert lora_run["records"]["chat"]["stdout"].strip() == "(0 turns)"
    results = json.loads((lora_run["out"] / "eval" / "synthetic_validation_fast.json").read_text())
    assert results["num_samples"] == 2 and results["metrics"]["n_expressions"] > 0
    table = (lora_run["out"] / "eval" / "synthetic_validation_fast.md").read_text()
    ciou = results["metrics"]["cIoU"]
    assert f"| {ciou:.3f} |" in table and "Metrics are fractions in [0, 1]" in table  # fractions, not percent
    assert f"| {ciou:.3f} |" in lora_run["records"]["evaluate"]["stdout"]


def test_merge_lora_dtype_and_no_absolute_paths(lora_run):
    merged = lora_run["out"] / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes - {"I64"} == {"BF16"}  # every floating tensor (I64: BatchNorm's num_batches_tracked)
    for path in merged.glob("*.json"):  # nothing points back at where the run was trained or moved to
        text = path.read_text()
        assert str(lora_run["trained"]) not in text and str(lora_run["run"]) not in text, path.name
    from transformers import AutoModel

    model = AutoModel.from_pretrained(merged, trust_remote_code=True)
    assert model.dtype == torch.bfloat16 and not any("lora" in n for n, _ in model.named_parameters())


def test_a_missing_base_is_one_line_naming_merge_lora(lora_run, capsys):
    final = lora_run["final"]
    base = lora_run["run"] / "base-model"
    hidden = lora_run["run"] / "base-model.hidden"
    base.rename(hidden)
    try:
        assert main(["segment", str(final), str(lora_run["root"] / "shapes.png"), "the dog"]) == 2
        err = capsys.readouterr().err
        check_one_line_error("segment", 2, err, "mllmseg merge-lora")
        assert str(base) in err and "LoRA adapter" in err
        assert main(["merge-lora", str(final), str(lora_run["root"] / "m2")]) == 2
        err = capsys.readouterr().err
        check_one_line_error("merge-lora", 2, err, str(base))
        assert "--base" in err
    finally:
        hidden.rename(base)


def test_a_folder_that_is_neither_says_so(tmp_path, capsys):
    make_image(tmp_path / "x.png")
    assert main(["segment", str(tmp_path), str(tmp_path / "x.png"), "the dog"]) == 2
    check_one_line_error("segment", 2, capsys.readouterr().err, "nor a LoRA adapter folder")


def test_checkpoints_store_the_base_as_final_does(tmp_path):
    """`checkpoint-N/` of a LoRA run (what resuming and `merge-lora <run>/checkpoint-N` read) carries the same
    relative base and adapter card as `final/`, not PEFT's absolute path and template."""
    recipe = load_recipe("tiny", FAST + ["training.max_steps=2", "training.save_steps=2",
                                         "lora={r: 4, alpha: 8, dropout: 0.0}"])
    run_training(recipe, output_dir=str(tmp_path / "run"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "final"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../base-model", folder
        card = (folder / "README.md").read_text()
        assert "[More Information Needed]" not in card and "`../base-model` (relative to this folder)" in card


def test_a_failed_merge_leaves_the_previous_merge_whole(lora_run):
    """The processor is loaded after the weights are merged; an adapter folder whose tokenizer config is broken used
    to leave `out_dir` with new weights and no processor. Now the old folder stays as it was, and nothing else."""
    import hashlib

    from mllmseg.training.merge import merge_adapter_checkpoint

    out = lora_run["out"] / "remerge"
    out.mkdir()
    merged = out / "merged"
    shutil.copytree(lora_run["out"] / "merged", merged)  # the fixture's bfloat16 merge
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in merged.iterdir()}
    broken = lora_run["run"] / "final-broken"  # beside final/, so its relative base path still resolves
    shutil.copytree(lora_run["final"], broken)
    (broken / "tokenizer_config.json").write_text("{ not json")
    try:
        with pytest.raises(Exception) as failure:
            merge_adapter_checkpoint(broken, merged)
        assert not isinstance(failure.value, (ImportError, NameError, AttributeError))  # the broken file, not us
        after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in merged.iterdir()}
        assert after == before
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging left behind
        # a merge that succeeds replaces the folder whole: float32 ("auto": the base's dtype) instead of bfloat16
        merge_adapter_checkpoint(lora_run["final"], merged)
        assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"
        assert (merged / "tokenizer_config.json").is_file() and (merged / "processor_config.json").is_file()
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    finally:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
