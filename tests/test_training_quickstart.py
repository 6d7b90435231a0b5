"""`mllmseg quickstart`, shortened: trains, evaluates on held-out images, saves + reloads remote code, writes
overlays and metrics. A short run is too short for thresholded masks (cIoU needs ~750+ steps, see the report), so
learning is asserted on the held-out loss of the saved checkpoint against the same model untrained."""
import json
import types

import torch

from mllmseg.commands import quickstart
from mllmseg.data.synthetic import SyntheticReferringDataset
from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.training.collator import MLLMSegCollator
from mllmseg.training.dataset import ConversationDataset
from mllmseg.training.recipes import load_recipe, synthetic_scene_kwargs

STEPS = 150
EVAL_IMAGES = 8


def _held_out_losses(model, processor, held_out):
    items = [ConversationDataset(held_out, seed=1, eval_prompt_prob=1.0)[i] for i in range(len(held_out))]
    with torch.no_grad():
        out = model.eval()(**MLLMSegCollator(processor)(items))
    return float(out.lm_loss), float(out.mask_loss)


def test_quickstart_learns(tmp_path):
    args = types.SimpleNamespace(output_dir=str(tmp_path / "qs"), seed=0, steps=STEPS, eval_images=EVAL_IMAGES,
                                 overlays=2, overrides=["training.logging_steps=50"])
    assert quickstart.run(args) == 0
    report = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert report["steps"] == STEPS and {"cIoU", "N-acc", "prec@0.5", "gIoU_per_expression"} <= set(report["metrics"])
    assert sorted(p.name for p in (tmp_path / "qs" / "overlays").iterdir()) == ["heldout_0.png", "heldout_1.png"]

    recipe = load_recipe("tiny")
    held_out = SyntheticReferringDataset(EVAL_IMAGES, seed=0, split="validation", **synthetic_scene_kwargs(recipe))
    untrained, tokenizer = build_tiny_model(seed=0, **recipe["model"]["tiny"])
    processor = build_processor(tokenizer, untrained.config, system_message="")
    trained = MLLMSegForConditionalGeneration.from_pretrained(report["checkpoint"])
    lm0, mask0 = _held_out_losses(untrained, processor, held_out)
    lm1, mask1 = _held_out_losses(trained, processor, held_out)
    print(f"\nheld-out after {STEPS} steps: lm loss {lm0:.3f} -> {lm1:.3f}, mask loss {mask0:.3f} -> {mask1:.3f}; "
          f"metrics {report['metrics']}")
    assert lm1 < 0.25 * lm0
    assert mask1 < mask0 - 0.2
