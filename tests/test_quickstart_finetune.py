"""The quickstart's fine-tune (issue 22): a short LoRA run of the `tiny_lora` recipe, from a rows folder on disk, on
the shipped tiny base raises the IoU of a colour the base has never seen while the ViT stays frozen; and
`mllmseg quickstart` runs its four steps end to end in a fresh process (shortened)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mllmseg.data.rows import ReferringRowsDataset
from mllmseg.loading import load_model
from mllmseg.quickstart import NEW_CONCEPT, evaluate_scenes, finetune_on_concept, heldout_scenes, tiny_base_path

STEPS = 120
ROOT = Path(__file__).resolve().parents[1]


def test_a_short_lora_finetune_raises_the_new_concepts_iou(tmp_path):
    base = tiny_base_path()
    model, processor = load_model(str(base), cpu=True)
    concept_set = heldout_scenes(12, concept=NEW_CONCEPT)
    before = evaluate_scenes(model, processor, concept_set, progress=False)["metrics"]

    result = finetune_on_concept(base, tmp_path, processor.tokenizer, train_images=300, steps=STEPS,
                                 overrides=["training.save_steps=1000", "training.logging_steps=20"], progress=False)
    token_ids = result["token_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(token_ids) == ["Ġcyan"]  # one new word, one embedding row
    assert len(ReferringRowsDataset(result["rows"])) == 300  # trained from the rows folder on disk
    assert result["global_step"] == STEPS
    tuned, tuned_processor = load_model(result["final"], cpu=True)
    after = evaluate_scenes(tuned, tuned_processor, concept_set, progress=False)["metrics"]
    assert after["cIoU"] > before["cIoU"] + 0.15, (before, after)

    # The product path: the ViT and the projector are frozen, the new word's embedding row moved, others did not.
    for name in ("vision_tower", "multi_modal_projector"):
        a, b = getattr(model.model, name).state_dict(), getattr(tuned.model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    old_rows, new_rows = model.get_input_embeddings().weight, tuned.get_input_embeddings().weight
    changed = (old_rows != new_rows).any(dim=1).nonzero().flatten().tolist()
    assert set(token_ids) <= set(changed) <= set(token_ids) | {processor.seg_token_id, processor.rej_token_id}


def test_the_quickstart_runs_its_four_steps(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mllmseg", "quickstart", "--output-dir", str(out), "--steps", "4",
               "--eval-images", "3", "--concept-images", "3", "--train-images", "12", "--overlays", "1",
               "training.save_steps=2", "training.logging_steps=2"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in printed
    assert "masks equal to the in-memory model's" in printed
    assert "| total |" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] == 4 and report["concept"] == NEW_CONCEPT
    assert set(report["before"]) == set(report["after"]) == {"old", "new"}
    assert (out / "data" / f"{NEW_CONCEPT}-train" / "metadata.jsonl").is_file()
    assert (out / "release" / "README.md").is_file() and (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in (out / "overlays").glob("*_0.png")) == ["base_heldout_0.png",
                                                                          f"finetuned_{NEW_CONCEPT}_0.png"]
    # The merged checkpoint is a plain remote-code folder: no adapter files, the shipped base's architecture.
    assert not (out / "final" / "adapter_config.json").exists()
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["vision_config"]["image_size"] == json.loads((tiny_base_path() / "config.json").read_text())[
        "vision_config"]["image_size"]

    # Run again: nothing is trained or written twice, and the same numbers come out.
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained to step 4" in again.stdout
    second = json.loads((out / "metrics.json").read_text())
    assert np.isclose(second["after"]["new"]["metrics"]["cIoU"], report["after"]["new"]["metrics"]["cIoU"])
