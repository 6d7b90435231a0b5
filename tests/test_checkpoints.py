import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mllmseg.base_checkpoint import from_internvl
from mllmseg.tiny import build_tiny_tokenizer

from ._models import batch_inputs, tiny

# Runs in a fresh `python -I` process where `mllmseg` cannot be imported: only the checkpoint's own remote code
# can build the model.
FRESH_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["mllmseg"] = None  # any `import mllmseg` now fails
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText
    folder, inputs_path, out_path = sys.argv[1:4]
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    model.eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    again = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(again).__name__ == "MLLMSegForConditionalGeneration"
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = model(**inputs)
    torch.save({"logits": out.logits, "pred_masks": out.pred_masks,
                "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                "mismatched": sorted(info["mismatched_keys"])}, out_path)
    """
)


def run_fresh(folder, inputs, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("text_model_type", ["qwen2", "llama"])
def test_remote_code_checkpoint_reloads_identically_in_a_fresh_process(tmp_path, text_model_type):
    model, tok = tiny(text_model_type)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    files = {p.name for p in folder.iterdir()}
    assert {"configuration_mllmseg.py", "modeling_mllmseg.py", "mask_decoder_mllmseg.py", "model.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mllmseg.MLLMSegForConditionalGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mllmseg.MLLMSegForConditionalGeneration"
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "mask_decoder.conv2.weight" in keys  # our own names, not legacy ones
    assert any(k.startswith("model.language_model.") for k in keys)

    check_fresh_reload_is_identical(model, tok, folder, tmp_path)


def check_fresh_reload_is_identical(model, tok, folder, tmp_path):
    """`folder` (saved from `model`) loads in a fresh `python -I` process without mllmseg, with no missing,
    unexpected or mismatched keys, and gives bit-identical logits and masks on a mixed-tile batch."""
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG], [SEG]."), (3, "Sure, [SEG].")])
    inputs["tile_grids"] = torch.tensor([[1, 1], [1, 2]])
    with torch.no_grad():
        expected = model(**inputs)
    got = run_fresh(folder, inputs, tmp_path)
    assert got["missing"] == [] and got["unexpected"] == [] and got["mismatched"] == []
    torch.testing.assert_close(got["logits"], expected.logits, atol=0, rtol=0)
    for a, b in zip(got["pred_masks"], expected.pred_masks):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("legacy_layout", [True, False])
def test_start_from_a_base_internvl_checkpoint(tmp_path, legacy_layout):
    base_tok = build_tiny_tokenizer(with_seg_tokens=False)
    n_base = len(base_tok)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=112,
            patch_size=14,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=n_base, tie_word_embeddings=False,
        ),
        image_token_id=base_tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = InternVLForConditionalGeneration(config)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, save_original_format=legacy_layout)
    base_tok.save_pretrained(base_dir)
    with safe_open(base_dir / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert ("language_model.lm_head.weight" in saved) == legacy_layout  # the trap the key mapping closes

    model, tok = from_internvl(base_dir)
    assert len(tok) == n_base + 2
    seg, rej = tok.convert_tokens_to_ids(["[SEG]", "[REJ]"])
    assert (model.config.seg_token_id, model.config.rej_token_id) == (seg, rej) and {seg, rej} == {n_base, n_base + 1}

    ours, theirs = model.state_dict(), base.state_dict()
    for key, value in theirs.items():
        if key in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            torch.testing.assert_close(ours[key][:n_base], value, atol=0, rtol=0)
            torch.testing.assert_close(ours[key][n_base:], value.mean(0).expand(2, -1), atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)
    bound = (6 / (64 + 3 * 64)) ** 0.5
    weight = model.mask_decoder.text_out_adapter.weight.detach()
    assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.8 * bound / 3**0.5  # xavier, not N(0, .02)

    # The result trains: a forward with [SEG] and masks gives finite losses.
    model.eval()
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    out = model(**inputs, labels=inputs["input_ids"], masks=[torch.ones(1, 50, 50)])
    assert torch.isfinite(out.loss)


def test_from_internvl_rejects_other_model_types(tmp_path):
    model, tok = tiny()
    model.config.save_pretrained(tmp_path)
    bad = json.loads((tmp_path / "config.json").read_text())
    bad["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="expected an InternVL checkpoint"):
        from_internvl(tmp_path, tokenizer=tok)
