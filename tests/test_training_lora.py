"""LoRA via PEFT: targets by type under the LLM, frozen ViT/projector, decoder + final norm trained, only the new
token rows of both embeddings trained; Qwen2 and Llama alike; trainable counts at 8B dimensions (meta device)."""
import pytest
import torch
from transformers import InternVLVisionConfig

from mllmseg.remote_code.configuration_mllmseg import MLLMSegConfig
from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.training.collator import MLLMSegCollator
from mllmseg.training.dataset import ConversationDataset
from mllmseg.data.synthetic import SyntheticReferringDataset
from mllmseg.training.lora import LoraRecipe, apply_lora, lora_target_regex, trainable_parameter_counts


@pytest.mark.parametrize("text_model_type", ["qwen2", "llama"])
def test_lora_trains_only_the_intended_parts(text_model_type):
    model, tokenizer = build_tiny_model(seed=0, text_model_type=text_model_type)
    processor = build_processor(tokenizer, model.config, system_message="")
    cfg = model.config
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LoraRecipe(r=4, alpha=8, dropout=0.0))
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora_names = [n for n in names if "lora_" in n]
    assert lora_names and all(".language_model.layers." in n for n in lora_names)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)
    assert any("mask_decoder" in n for n in names)
    assert any("language_model.norm.modules_to_save" in n for n in names)
    assert sum("trainable_tokens" in n for n in names) == 2  # embed_tokens and lm_head, new rows only
    counts = trainable_parameter_counts(peft_model)
    assert counts["embeddings"] == 2 * 2 * cfg.text_config.hidden_size and counts["vision"] == counts["other"] == 0

    # one real optimisation step with a big lr: only [SEG]/[REJ] rows of the embeddings move
    ds = ConversationDataset(SyntheticReferringDataset(2, image_size=(112, 112), no_target_prob=0.5), seed=0)
    batch = MLLMSegCollator(processor)([ds[0], ds[1]])
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=10.0)
    for _ in range(2):  # LoRA B starts at zero: two steps so A and B both move
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = peft_model.merge_and_unload()
    after = merged.state_dict()
    new = [cfg.seg_token_id, cfg.rej_token_id]
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        changed = (after[key] != before[key]).any(1).nonzero().flatten().tolist()
        assert changed and set(changed) <= set(new), (key, changed)
    for key in after:
        moved = not torch.equal(after[key], before[key])
        if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            assert not moved, key
    assert not torch.equal(after["model.language_model.layers.0.self_attn.q_proj.weight"],
                           before["model.language_model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(after["model.language_model.norm.weight"], before["model.language_model.norm.weight"])


def test_full_embedding_mode_and_regex():
    model, _ = build_tiny_model(seed=0)
    regex = lora_target_regex(model)
    assert "vision" not in regex and regex.startswith("^model\\.language_model")
    counts = trainable_parameter_counts(apply_lora(model, LoraRecipe(r=4, alpha=8, embeddings="full")))
    vocab, width = model.config.text_config.vocab_size, model.config.text_config.hidden_size
    assert counts["embeddings"] == 2 * vocab * width


def internlm2_reference_trainable(vocab, hidden, layers, heads, kv_heads, inter, decoder, r=64):
    """The reference recipe at 8B: LoRA on InternLM2's fused wqkv, wo, w1, w2, w3 + full input and output embeddings
    + decoder + final norm."""
    kv = hidden // heads * kv_heads
    lora_per_layer = r * ((hidden + hidden + 2 * kv) + (hidden + hidden) + 3 * (hidden + inter))
    return layers * lora_per_layer + 2 * vocab * hidden + decoder + hidden


def test_trainable_counts_at_8b_on_meta_device():
    vocab = 92553 + 2
    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, image_size=448, patch_size=14)
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)
    config = MLLMSegConfig(vision_config=vision, text_config=text, image_token_id=92546, image_start_token_id=92544,
                           image_end_token_id=92545, seg_token_id=vocab - 2, rej_token_id=vocab - 1,
                           tie_word_embeddings=False)
    with torch.device("meta"):
        model = MLLMSegForConditionalGeneration(config)
    decoder = sum(p.numel() for p in model.mask_decoder.parameters())
    ours = trainable_parameter_counts(apply_lora(model, LoraRecipe()))
    reference = internlm2_reference_trainable(vocab, 4096, 32, 32, 8, 14336, decoder)
    print(f"\n8B trainable: ours {ours['trainable']:,} ({ours}), reference recipe {reference:,}")
    assert abs(reference - 943.6e6) < 0.1e6  # the figure SPEC section 4 quotes
    assert ours["embeddings"] == 2 * 2 * 4096 and ours["final_norm"] == 4096 and ours["mask_decoder"] == decoder
    assert ours["lora"] == 32 * 64 * (3 * 4096 + 4096 + 2 * 1024 + 2 * 4096 + 3 * (4096 + 14336))  # q,k,v split
    assert ours["trainable"] < 0.25 * reference
