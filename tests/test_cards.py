"""Model cards: the rendered README's Hub metadata, model-index (parsed back by huggingface_hub), tables, sections."""
import json

import pytest
from huggingface_hub import ModelCard

from mllmseg.hub.cards import build_model_card, load_eval_results, metrics_table, template_path

CONFIG = {"text_config": {"model_type": "internlm2"}, "mask_head": "dsff", "seg_tiling": "single"}
RES = {"dataset": "refcocog", "split": "val", "mode": "fast",
       "metrics": {"cIoU": 0.799, "gIoU_per_expression": 0.8123, "gIoU_per_image": 0.805, "prec@0.5": 0.9,
                   "N-acc": None, "T-acc": None, "n_expressions": 28}}
GRES = {"dataset": "grefcoco", "split": "val", "mode": "generate",
        "metrics": {"cIoU": 0.716, "gIoU_per_expression": 0.751, "gIoU_per_image": 0.74, "prec@0.5": None,
                    "N-acc": 0.732, "T-acc": 0.95, "n_expressions": 40}}

SUMMARY = {"global_step": 1200, "train_loss": 0.43212, "base_model": "/data/bases/InternVL2_5-8B-mllmseg",
           "trainable": {"trainable": 1000, "all": 9000, "mask_decoder": 900, "lora": 100},
           "recipe": {"name": "res_test", "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
                      "data": {"train": [{"type": "refer", "dataset": "refcoco", "split": "train"},
                                         {"type": "refer", "dataset": "refcoco+", "split": "train"},
                                         {"type": "refer", "dataset": "refclef", "split": "train"},
                                         {"type": "grefcoco", "split": "train"}]},
                      "training": {"learning_rate": 4.0e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
                                   "weight_decay": 0.05, "per_device_train_batch_size": 4,
                                   "gradient_accumulation_steps": 2, "bf16": True, "gradient_checkpointing": True}}}


def test_template_is_found_and_has_jinja_slots():
    text = template_path().read_text()
    assert text.startswith("---\n{{ card_data }}\n---")
    for slot in ("metrics_table", "repo_id", "model_name"):
        assert "{{ " + slot + " }}" in text


def test_card_metadata_and_model_index():
    card = build_model_card("org/MLLMSeg-InternVL2.5-8B", config=CONFIG, eval_results=[RES, GRES],
                            base_model="OpenGVLab/InternVL2_5-8B", num_parameters=8_100_000_000,
                            training_summary=SUMMARY)
    reparsed = ModelCard(str(card))  # what the Hub would parse
    data = reparsed.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    assert data.base_model == "OpenGVLab/InternVL2_5-8B"
    assert data.license == "apache-2.0"
    assert data.datasets == ["jxu124/refcoco", "jxu124/refcocoplus"]  # what it was trained on, not evaluated on
    assert "custom_code" in data.tags
    results = {(r.dataset_type, r.metric_type): r for r in data.eval_results}
    assert results[("jxu124/refcocog", "ciou")].metric_value == 0.799
    assert results[("jxu124/refcocog", "giou_per_expression")].metric_value == 0.812
    assert results[("jxu124/refcocog", "giou_per_image")].metric_value == 0.805
    assert results[("grefcoco", "n_acc")].metric_value == 0.732
    assert ("jxu124/refcocog", "n_acc") not in results  # None metrics are left out
    assert all(r.task_type == "image-segmentation" and r.dataset_split == "val" for r in data.eval_results)
    assert data.model_name == "MLLMSeg-InternVL2.5-8B"
    from mllmseg.remote_code.compat_mllmseg import SUPPORTED_TRANSFORMERS

    assert f"`transformers` ({SUPPORTED_TRANSFORMERS}: the releases it is" in str(card)  # what the remote code accepts


def test_card_body_sections():
    text = str(build_model_card("org/m", config=CONFIG, eval_results=[RES]))
    assert 'AutoModel.from_pretrained(repo, trust_remote_code=True' in text and 'repo = "org/m"' in text
    assert "AutoProcessor.from_pretrained(repo, trust_remote_code=True)" in text
    assert 'model.segment(processor, image, ["the man in red", "all dogs"])' in text
    assert "model.chat(tokenizer, pixel_values" in text
    assert "No training record came with this release" in text and "LoRA r=64" not in text
    assert "datasets" not in text.split("---")[1]  # evaluation sets are not training data
    assert "## Limitations" in text
    assert "arXiv:2508.04107" in text and "Light-weight Mask Decoder" in text
    assert "| RefCOCOg | val | fast | 0.799 | 0.812 | 0.805 | 0.900 | – | – | 28 |" in text
    assert "Metrics are fractions in [0, 1]" in text
    assert "Base model | not recorded" in text and "base_model" not in text.split("---")[1]


def test_training_section_describes_the_recorded_run():
    text = str(build_model_card("org/m", config=CONFIG, training_summary=SUMMARY, training_notes="Two stages."))
    section = text.split("## Training\n")[1].split("## Limitations")[0]
    assert "recipe `res_test`) for 1200 optimiser steps; mean training loss 0.4321." in section
    assert "RefCOCO (train); RefCOCO+ (train); RefCLEF (train); gRefCOCO (train)" in section
    assert "LoRA r=8, alpha=16, dropout=0.05" in section and "1,000 of 9,000 parameters trained (mask_decoder 900" in section
    assert "learning rate 4e-05, cosine schedule, warmup 3%, weight decay 0.05, batch 4 per device x 2" in section
    assert "Precision: bf16; gradient checkpointing" in section and section.strip().endswith("Two stages.")
    assert "SPEC" not in text  # no reference to a document a Hub reader cannot see


def test_metrics_table_labels_both_giou_conventions():
    table = metrics_table([RES, GRES])
    header = table.splitlines()[0]
    assert "gIoU (mean over expressions, LISA)" in header and "gIoU (mean over images, MLLMSeg ref.)" in header
    assert "| gRefCOCO | val | generate | 0.716 | 0.751 | 0.740 | – | 0.732 | 0.950 | 40 |" in table
    assert "No evaluation results" in metrics_table([])


def test_load_eval_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation JSON not found"):
        load_eval_results([tmp_path / "nope.json"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cIoU": 1}))
    with pytest.raises(ValueError, match="no 'metrics' object"):
        load_eval_results([bad])
    good = tmp_path / "good.json"
    good.write_text(json.dumps(RES))
    assert load_eval_results([good]) == [RES]
