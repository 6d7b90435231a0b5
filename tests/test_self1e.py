"""The SELF1E mask head (decoder-free, one [SEG], dual-perception attention), on tiny models."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllmseg.hub.release import remote_code_closure
from mllmseg.remote_code.conversation_mllmseg import evaluation_prompt
from mllmseg.remote_code.self1e_head_mllmseg import SELF1EMaskHead, count_self1e_parameters, unshuffle_tokens
from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.training.recipes import load_recipe
from mllmseg.training.trainer import run_training

from ._models import batch_inputs, image_text, tiny
from .test_checkpoints import check_fresh_reload_is_identical
from .test_inference import ForceSequence, check_batch_equals_per_image_runs


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model(seed=3, mask_head="self1e")
    return model, tok, build_processor(tok, model.config)


def image(w=120, h=90, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def final_states(model, ids, image_outputs, attention_mask=None):
    """Final states of the mask pass (dual-perception mask when the sequence holds a [SEG])."""
    with torch.no_grad():
        if (ids == model.config.seg_token_id).any():
            return model.dual_perception_states(ids, attention_mask, None, image_outputs)
        out = model(input_ids=ids, attention_mask=attention_mask, mm_encoder_outputs={"image": image_outputs},
                    output_hidden_states=True)
    return out.hidden_states[-1]


def test_logits_do_not_see_the_answer(setup):
    """The [SEG]/[REJ] decision must not read the answer: with the dual mask, text after the image would see a
    later [SEG] through the image tokens, so logits come from the causal pass. Swapping a [SEG] for [REJ] changes
    no logit before it, while the masks (dual pass) do depend on the later [SEG]."""
    model, tok, proc = setup
    pixel_values = proc.image_processor(image(), tiling="single")["pixel_values"]
    ids = tok([image_text(model, 1, "Segment a and b. Sure, a:[SEG], b:[SEG].")], return_tensors="pt",
              add_special_tokens=False)["input_ids"]
    seg = (ids[0] == model.config.seg_token_id).nonzero().flatten()
    swapped = ids.clone()
    swapped[0, seg[1]] = model.config.rej_token_id
    with torch.no_grad():
        both = model(input_ids=ids, pixel_values=pixel_values)
        one = model(input_ids=swapped, pixel_values=pixel_values)
    torch.testing.assert_close(one.logits[0, : seg[1]], both.logits[0, : seg[1]], atol=1e-6, rtol=0)
    # the first [SEG]'s mask does see whether a second [SEG] exists (image tokens attend to every [SEG])
    assert both.pred_masks[0].shape[0] == 2 and one.pred_masks[0].shape[0] == 1
    assert not torch.allclose(one.pred_masks[0][0], both.pred_masks[0][0])


def test_config_and_head_shapes():
    with pytest.raises(ValueError, match="mask_head must be one of"):
        tiny(mask_head="sam")
    with pytest.raises(ValueError, match="vision_feature_layer=-1"):
        tiny(mask_head="self1e", vision_feature_layer=-2)
    # unshuffle_tokens inverts InternVL's pixel shuffle.
    model, _ = tiny(mask_head="self1e")
    x = torch.randn(2, 8, 8, 5)
    shuffled = model.model.pixel_shuffle(x, scale_factor=0.5)  # (2, 4, 4, 20)
    assert torch.equal(unshuffle_tokens(shuffled, 2), x)
    # InternVL2.5 sizes (448 px, patch 14: G = 32, g = 16): 64 x 64 logits per tile, 32 x 32 at low resolution.
    head = SELF1EMaskHead(text_dim=16, vision_grid=32).eval()
    fused = head.fuse_image(torch.randn(3, 256, 16), torch.randn(3, 256, 16), torch.randn(3, 1024, 16))
    assert fused[0].shape == (3, 64, 64, 16) and fused[1].shape == (3, 32, 32, 16)
    high, low = head.decode(fused, torch.randn(3, 16))
    assert high.shape == (3, 64, 64) and low.shape == (3, 32, 32) and head.output_grid == 64
    t = 4096  # 8B: refill MLP (T->T->T) + two T->T->4T MLPs
    assert count_self1e_parameters(t) == 2 * (t * t + t) + 2 * (t * t + t + t * 4 * t + 4 * t) == 201_375_744
    # Tiny scale (112 px, patch 14: G = 8): 16 x 16 per tile, stitched on the tile canvas.
    tok_model, tok = tiny(mask_head="self1e")
    inputs = batch_inputs(tok_model, tok, [(1, "Sure, [SEG], [SEG]."), (3, "Sure, [SEG].")])
    inputs["tile_grids"] = torch.tensor([[1, 1], [1, 2]])
    with torch.no_grad():
        out = tok_model(**inputs)
    assert [tuple(m.shape) for m in out.pred_masks] == [(2, 16, 16), (1, 16, 32)]


def test_dual_perception_mask_values(setup):
    model, tok, _ = setup
    img, seg, txt = model.config.image_token_id, model.config.seg_token_id, 5
    ids = torch.tensor([[txt, img, img, txt, seg, txt, 0], [txt, img, img, txt, txt, txt, txt]])
    keep = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    allowed = model.dual_perception_mask(ids, keep, torch.float32)[:, 0] == 0
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    a = allowed[0]
    assert a[1, 2] and a[2, 1]  # image <-> image both ways
    assert a[1, 4] and a[2, 4]  # image -> the later [SEG]
    assert not a[1, 3] and not a[1, 5]  # image -> later text: no
    assert torch.equal(a[[0, 3, 4, 5]][:, :6], causal[[0, 3, 4, 5]][:, :6])  # text rows stay causal
    assert not a[:6, 6].any() and a[6, 6]  # padding: no one attends to it, it attends to itself only
    assert torch.equal(allowed[1], causal)  # a sample without [SEG] keeps the plain causal mask


def test_dual_perception_reaches_the_model(setup):
    model, tok, proc = setup
    pixel_values = proc.image_processor(image(), tiling="single")["pixel_values"]
    image_outputs = model.get_image_features(pixel_values, return_dict=True)
    text = "Please segment it. Sure, [SEG] done."
    ids = tok([image_text(model, 1, text)], return_tensors="pt", add_special_tokens=False)["input_ids"]
    positions = (ids[0] == model.config.image_token_id).nonzero().flatten()
    seg_pos = int((ids[0] == model.config.seg_token_id).nonzero()[0])
    base = final_states(model, ids, image_outputs)

    # Image <-> image: changing the LAST image token's feature changes the FIRST image token's state, but only with a
    # [SEG] in the sequence (without one, attention is causal).
    changed = BaseModelOutputWithPooling(last_hidden_state=image_outputs.last_hidden_state,
                                         pooler_output=image_outputs.pooler_output.clone())
    changed.pooler_output[0, -1] += 1.0
    first = int(positions[0])
    assert not torch.allclose(final_states(model, ids, changed)[0, first], base[0, first])
    no_seg = ids.clone()
    no_seg[0, seg_pos] = model.config.rej_token_id
    assert torch.equal(final_states(model, no_seg, changed)[0, first], final_states(model, no_seg, image_outputs)[0, first])

    # Image -> later [SEG]: changing the [SEG] embedding changes image-token states; changing the token after [SEG]
    # changes no earlier state (text and image queries never reach later non-[SEG] tokens).
    embeddings = model.get_input_embeddings().weight
    original = embeddings.data.clone()
    try:
        with torch.no_grad():
            embeddings[model.config.seg_token_id] += 0.5
        assert not torch.allclose(final_states(model, ids, image_outputs)[0, positions], base[0, positions])
        embeddings.data.copy_(original)
        after = ids.clone()
        after[0, seg_pos + 1] = tok.convert_tokens_to_ids("<|im_start|>")
        torch.testing.assert_close(final_states(model, after, image_outputs)[0, : seg_pos + 1], base[0, : seg_pos + 1],
                                   atol=1e-6, rtol=0)
    finally:
        embeddings.data.copy_(original)
    # Text before the image is causal: unaffected by everything after it.
    torch.testing.assert_close(final_states(model, ids, changed)[0, : first], base[0, : first], atol=1e-6, rtol=0)


def test_eager_and_sdpa_agree_and_flash_attention_is_refused():
    model, tok = tiny(mask_head="self1e", seed=1)
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG], [SEG]."), (3, "Sure, a longer answer [SEG].")])
    inputs["tile_grids"] = torch.tensor([[1, 1], [1, 2]])
    outs = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(**inputs)
    torch.testing.assert_close(outs["eager"].logits, outs["sdpa"].logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(outs["eager"].pred_masks, outs["sdpa"].pred_masks):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="mask_head 'self1e' needs its dual-perception 4D attention mask.*sdpa"):
        model(**inputs)


def test_training_steps_lower_the_loss():
    model, tok = tiny(mask_head="self1e", seed=2)
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG], [SEG]."), (1, "Sure, [SEG].")])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    yy, xx = torch.meshgrid(torch.arange(112), torch.arange(112), indexing="ij")
    masks = [torch.stack([xx < 56, yy < 40]), (xx > 70)[None]]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, mask_losses = [], []
    for _ in range(5):
        out = model(**inputs, labels=labels, masks=masks)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
        mask_losses.append(float(out.mask_loss.detach()))
    assert losses[-1] < 0.85 * losses[0], losses
    assert mask_losses[-1] < mask_losses[0], mask_losses
    # The low-resolution auxiliary term is part of the training loss only.
    with torch.no_grad():
        train_loss = model(**inputs, masks=masks).mask_loss
        model.eval()
        eval_loss = model(**inputs, masks=masks).mask_loss
    assert float(train_loss) > float(eval_loss)


def test_run_training_from_the_tiny_self1e_recipe(tmp_path):
    recipe = load_recipe("tiny_self1e", ["training.max_steps=2", "training.per_device_train_batch_size=2",
                                         "training.logging_steps=1", "training.save_strategy=no",
                                         "data.train.num_images=8"])
    result = run_training(recipe, output_dir=str(tmp_path / "run"))
    assert result["global_step"] == 2
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["mask_head"] == "self1e"
    assert "self1e_head_mllmseg.py" in remote_code_closure(tmp_path / "run" / "final")


def test_checkpoint_reloads_in_a_fresh_process_with_identical_masks(tmp_path):
    model, tok = tiny(mask_head="self1e", seed=4)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert (folder / "self1e_head_mllmseg.py").is_file()
    assert "self1e_head_mllmseg.py" in remote_code_closure(folder)
    check_fresh_reload_is_identical(model, tok, folder, tmp_path)


def test_fast_and_generate_modes_give_the_same_masks(setup):
    model, tok, proc = setup
    images, expr_lists = [image(), image(90, 120, seed=5)], [["the red circle", "the blue square"], ["a cat"]]
    fast = model.segment(proc, images, expr_lists, mode="fast")
    for img, exprs, res in zip(images, expr_lists, fast):
        answer_ids = tok(res.text.replace("[REJ]", "[SEG]") + "<|im_end|>", add_special_tokens=False)["input_ids"]
        prompt_len = proc(images=[img], text=[evaluation_prompt(exprs)[0]])["input_ids"].shape[1]
        forcing = LogitsProcessorList([ForceSequence(answer_ids, prompt_len, tok.convert_tokens_to_ids("<|im_end|>"))])
        generated = model.segment(proc, img, exprs, mode="generate", generation_config={"logits_processor": forcing},
                                  max_new_tokens=len(answer_ids) + 2)
        assert generated.rejected.tolist() == [False] * len(exprs)
        torch.testing.assert_close(generated.probabilities, res.probabilities, atol=2e-4, rtol=1e-3)


def test_generate_without_seg_runs_no_mask_pass(setup, monkeypatch):
    model, tok, proc = setup
    q, _ = evaluation_prompt(["a"])
    prompt_len = proc(images=[image()], text=[q])["input_ids"].shape[1]
    answer = tok("Sure,a:[REJ].<|im_end|>", add_special_tokens=False)["input_ids"]
    forcing = LogitsProcessorList([ForceSequence(answer, prompt_len, tok.convert_tokens_to_ids("<|im_end|>"))])
    calls = []
    original = model.dual_perception_mask
    monkeypatch.setattr(model, "dual_perception_mask", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = model.segment(proc, image(), ["a"], mode="generate", generation_config={"logits_processor": forcing})
    assert result.rejected.tolist() == [True] and not result.masks.any() and calls == []


def test_batches_with_different_tile_counts_equal_per_image_runs(setup):
    model, tok, proc = setup
    check_batch_equals_per_image_runs(model, proc)


def test_lora_on_llm_and_vit_trains_through_the_dual_mask():
    from mllmseg.training.lora import LoraRecipe, apply_lora

    model, tok = tiny(mask_head="self1e", seed=5)
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    peft_model = apply_lora(model, LoraRecipe(r=4, alpha=8, vision=True)).train()
    out = peft_model(**inputs, masks=[torch.ones(1, 112, 112, dtype=torch.bool)])
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("vision_tower" in n and "lora_B" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("language_model" in n and "lora_B" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("mask_decoder" in n and g is not None for n, g in grads.items())
