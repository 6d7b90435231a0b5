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


def test_template_is_found_and_has_jinja_slots():
    text = template_path().read_text()
    assert text.startswith("---\n{{ card_data }}\n---")
    for slot in ("metrics_table", "repo_id", "model_name"):
        assert "{{ " + slot + " }}" in text


def test_card_metadata_and_model_index():
    card = build_model_card("org/MLLMSeg-InternVL2.5-8B", config=CONFIG, eval_results=[RES, GRES],
                            base_model="OpenGVLab/InternVL2_5-8B", num_parameters=8_100_000_000)
    reparsed = ModelCard(str(card))  # what the Hub would parse
    data = reparsed.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    assert data.base_model == "OpenGVLab/InternVL2_5-8B"
    assert data.license == "apache-2.0"
    assert data.datasets == ["jxu124/refcocog"]
    assert "custom_code" in data.tags
    results = {(r.dataset_type, r.metric_type): r for r in data.eval_results}
    assert results[("jxu124/refcocog", "ciou")].metric_value == 79.9
    assert results[("jxu124/refcocog", "giou_per_expression")].metric_value == 81.23
    assert results[("jxu124/refcocog", "giou_per_image")].metric_value == 80.5
    assert results[("grefcoco", "n_acc")].metric_value == 73.2
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
    assert "## Training recipe" in text and "LoRA r=64" in text
    assert "## Limitations" in text
    assert "arXiv:2508.04107" in text and "Light-weight Mask Decoder" in text
    assert "| RefCOCOg | val | fast | 79.90 | 81.23 | 80.50 | 90.00 | – | – | 28 |" in text
    assert "Base model | not recorded" in text and "base_model" not in text.split("---")[1]


def test_metrics_table_labels_both_giou_conventions():
    table = metrics_table([RES, GRES])
    header = table.splitlines()[0]
    assert "gIoU (mean over expressions, LISA)" in header and "gIoU (mean over images, MLLMSeg ref.)" in header
    assert "| gRefCOCO | val | generate | 71.60 | 75.10 | 74.00 | – | 73.20 | 95.00 | 40 |" in table
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
