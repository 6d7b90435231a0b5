import pytest
import torch
import torch.nn.functional as F

from mllmseg import MLLMSegConfig
from mllmseg.remote_code.compat_mllmseg import disable_activation_checkpointing, enable_activation_checkpointing
from mllmseg.remote_code.modeling_mllmseg import preferred_attn_implementation
from mllmseg.tiny import build_tiny_tokenizer, tiny_config

from ._models import batch_inputs, tiny


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_and_tokenizer(request):
    return tiny(request.param)


def manual_masks(model, input_ids, pixel_values, sample, tile_slice):
    """Mask logits for one sample's [SEG] tokens, derived by hand with explicit loops (not the model's own
    bookkeeping): ViT last layer without CLS, LLM states preceding each <IMG_CONTEXT>, states preceding [SEG]."""
    cfg = model.config
    with torch.no_grad():
        vision = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        hidden = model.model(input_ids=input_ids, mm_encoder_outputs={"image": vision}).last_hidden_state
    ids = input_ids[sample].tolist()
    img_pos = [p for p, t in enumerate(ids) if t == cfg.image_token_id]
    seg_pos = [p for p, t in enumerate(ids) if t == cfg.seg_token_id]
    vit = vision.last_hidden_state[tile_slice, 1:]
    llm = torch.stack([hidden[sample, p - 1] for p in img_pos]).view(-1, cfg.tokens_per_tile, hidden.shape[-1])
    out = []
    for p in seg_pos:
        seg = hidden[sample, p - 1][None].expand(vit.shape[0], -1)
        with torch.no_grad():
            out.append(model.mask_decoder(vit, llm, seg))  # one map per tile
    return out


def test_forward_outputs_and_bookkeeping_across_samples(model_and_tokenizer):
    model, tok = model_and_tokenizer
    specs = [
        (1, "What are the red circle, the square? Sure, they are [SEG], [SEG]."),
        (1, "What is the dog? Sure, [REJ]."),
        (3, "What is the cat? Sure, it is [SEG]."),  # 1x2 grid + thumbnail
    ]
    inputs = batch_inputs(model, tok, specs)
    grids = torch.tensor([[1, 1], [1, 1], [1, 2]])
    with torch.no_grad():
        out = model(**inputs, tile_grids=grids)
    assert out.logits.shape == (*inputs["input_ids"].shape, len(tok))
    size = model.config.image_size
    assert [tuple(m.shape) for m in out.pred_masks] == [(2, size, size), (0, size, size), (1, size, 2 * size)]

    # Sample 0: one tile, two [SEG].
    expected = manual_masks(model, inputs["input_ids"], inputs["pixel_values"], 0, slice(0, 1))
    for k in range(2):
        torch.testing.assert_close(out.pred_masks[0][k], expected[k][0], atol=1e-4, rtol=1e-4)
    # Sample 2: tiles 2..4 of the batch (the reference code would index the wrong image here); the canvas is
    # [tile 0 | tile 1], the thumbnail (tile 2) is not drawn.
    expected = manual_masks(model, inputs["input_ids"], inputs["pixel_values"], 2, slice(2, 5))[0]
    torch.testing.assert_close(out.pred_masks[2][0][:, :size], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pred_masks[2][0][:, size:], expected[1], atol=1e-4, rtol=1e-4)


def test_batched_masks_equal_single_sample_runs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    specs = [(1, "What is a? Sure, it is [SEG]."), (2, "What are b, c and d? Sure, [SEG], [REJ], [SEG].")]
    inputs = batch_inputs(model, tok, specs)
    grids = torch.tensor([[1, 1], [2, 1]])
    with torch.no_grad():
        batched = model(**inputs, tile_grids=grids).pred_masks
        tiles = [0, 1, 3]
        for b, spec in enumerate(specs):
            single = batch_inputs(model, tok, [spec])
            single["pixel_values"] = inputs["pixel_values"][tiles[b] : tiles[b + 1]]
            alone = model(**single, tile_grids=grids[b : b + 1]).pred_masks[0]
            torch.testing.assert_close(batched[b], alone, atol=1e-4, rtol=1e-4)


def test_losses_match_their_definitions(model_and_tokenizer):
    model, tok = model_and_tokenizer
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG] and [SEG]."), (1, "Sure, [SEG].")])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(2, 40, 56, generator=g) > 0.5, torch.rand(1, 112, 112, generator=g) > 0.7]
    with torch.no_grad():
        out = model(**inputs, labels=labels, masks=masks)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, lm)
    bce, dice = [], []
    for pred, gt in zip(out.pred_masks, masks):
        for k in range(gt.shape[0]):
            logit = F.interpolate(pred[k][None, None], size=gt.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            target = gt[k].float()
            bce.append(F.binary_cross_entropy_with_logits(logit, target))
            p = logit.sigmoid()
            dice.append(1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1))
    torch.testing.assert_close(out.mask_loss, torch.stack(bce).mean() + torch.stack(dice).mean())
    torch.testing.assert_close(out.loss, out.lm_loss + out.mask_loss)


def test_loss_weights_come_from_the_config():
    model, tok = tiny(lm_loss_weight=0.5, bce_loss_weight=2.0, dice_loss_weight=0.0)
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    labels = inputs["input_ids"].clone()
    masks = [torch.ones(1, 30, 30)]
    with torch.no_grad():
        out = model(**inputs, labels=labels, masks=masks)
        logit = F.interpolate(out.pred_masks[0][None], size=(30, 30), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out.mask_loss, 2.0 * F.binary_cross_entropy_with_logits(logit, masks[0]))
    torch.testing.assert_close(out.loss, 0.5 * out.lm_loss + out.mask_loss)


def test_backward_reaches_decoder_llm_and_vit(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model.zero_grad()
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    out = model(**inputs, labels=inputs["input_ids"], masks=[torch.ones(1, 112, 112)])
    out.loss.backward()
    for name in ["mask_decoder.conv2.weight", "mask_decoder.text_down.weight", "lm_head.weight"]:
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    layer0 = next(p for n, p in model.model.language_model.named_parameters() if "layers.0" in n and p.dim() == 2)
    assert layer0.grad.abs().sum() > 0
    model.zero_grad()


def test_batch_without_seg_still_touches_every_decoder_parameter():
    model, tok = tiny()
    inputs = batch_inputs(model, tok, [(1, "Sure, [REJ].")])
    out = model(**inputs, labels=inputs["input_ids"], masks=[None])
    assert float(out.mask_loss.detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in model.mask_decoder.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    model, tok = tiny()
    model.train()
    model.mask_decoder.eval()  # dropout/batch-norm noise off, so the two runs are comparable
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    kwargs = dict(labels=inputs["input_ids"], masks=[torch.ones(1, 112, 112)])

    def grads():
        model.zero_grad()
        model(**inputs, **kwargs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    enable_activation_checkpointing(model, use_reentrant=False)
    assert model.model.language_model.gradient_checkpointing
    checkpointed = grads()
    disable_activation_checkpointing(model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


def test_bfloat16_forward_on_cpu():
    model, tok = tiny()
    model = model.to(torch.bfloat16)
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], masks=[torch.ones(1, 20, 20)])
    assert out.pred_masks[0].dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and torch.isfinite(out.pred_masks[0].float()).all()


def test_attention_implementation_choice(tmp_path):
    # This machine has no CUDA: flash-attention must never be chosen, whatever the dtype.
    assert not torch.cuda.is_available()
    assert preferred_attn_implementation(torch.bfloat16) == "sdpa"
    assert preferred_attn_implementation(torch.float32) == "sdpa"
    model, _ = tiny()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"


# --- bad input ---------------------------------------------------------------------------------------------------
def test_error_when_mask_count_differs_from_seg_count():
    model, tok = tiny()
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG] and [SEG].")])
    with pytest.raises(ValueError, match=r"sample 0: 1 ground-truth masks for 2 \[SEG\] tokens"):
        model(**inputs, masks=[torch.ones(1, 10, 10)])


def test_error_when_image_tokens_and_tiles_disagree():
    model, tok = tiny()
    inputs = batch_inputs(model, tok, [(2, "Sure, [SEG].")])
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with pytest.raises(ValueError, match="image tokens and tiles disagree.*pixel_values has 1 tiles"):
        model(**inputs, tile_grids=torch.tensor([[1, 2]]))
    truncated = batch_inputs(model, tok, [(1, "Sure.")])
    truncated["input_ids"] = truncated["input_ids"][:, :-8]  # cut into the image tokens
    truncated["attention_mask"] = truncated["attention_mask"][:, :-8]
    truncated["input_ids"][0, 5] = tok.convert_tokens_to_ids("[SEG]")
    with pytest.raises(ValueError, match="not a multiple of 16 per tile"):
        model(**truncated)


def test_error_when_several_tiles_have_no_grid():
    model, tok = tiny()
    inputs = batch_inputs(model, tok, [(3, "Sure, [SEG].")])
    with pytest.raises(ValueError, match="sample 0 has 3 tiles: pass tile_grids"):
        model(**inputs)
    with pytest.raises(ValueError, match="sample 0 has 3 tiles but tile_grids says 2x2"):
        model(**inputs, tile_grids=torch.tensor([[2, 2]]))


def test_error_for_unsupported_vision_width():
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="unsupported vision width 60"):
        tiny_config(tok, vision_width=60)  # not divisible by 8 decoder heads
    with pytest.raises(ValueError, match="seg_tiling must be one of"):
        tiny_config(tok, seg_tiling="tiles")


def test_config_derives_decoder_sizes():
    cfg = MLLMSegConfig()  # InternVL2.5 defaults: 448 px, patch 14, ViT 1024
    assert (cfg.vision_grid, cfg.llm_grid, cfg.tokens_per_tile, cfg.image_seq_length) == (32, 16, 256, 256)
    tiny_cfg = tiny_config(build_tiny_tokenizer(), image_size=224)
    assert (tiny_cfg.vision_grid, tiny_cfg.tokens_per_tile) == (16, 64)


def test_tiny_vit_can_start_with_2d_sincos_position_embeddings():
    from mllmseg.tiny import build_tiny_model, sincos_position_embeddings

    default, _ = tiny(vision_width=32)
    assert torch.count_nonzero(default.model.vision_tower.embeddings.position_embeddings) == 0  # transformers' zeros
    model, _ = build_tiny_model(sincos_positions=True, vision_width=32)
    table = model.model.vision_tower.embeddings.position_embeddings[0].detach()  # [1 + grid^2, D], CLS first
    assert table.shape == (1 + 8 * 8, 32)  # 112 px tiles, patch 14
    assert torch.count_nonzero(table[0]) == 0
    patches = table[1:].view(8, 8, 32)  # [row, col, D]
    # The first half of the channels encodes the column, the second half the row, so patches in one column share
    # the first half exactly and patches in one row share the second.
    torch.testing.assert_close(patches[:, 3, :16], patches[0:1, 3, :16].expand(8, -1))
    torch.testing.assert_close(patches[5, :, 16:], patches[5:6, 0, 16:].expand(8, -1))
    assert len({tuple(row.tolist()) for row in table[1:]}) == 64  # every patch position is told apart
    # Nearer patches have more similar embeddings (a distance-aware code, unlike transformers' zeros).
    dist = lambda a, b: float((patches[a] - patches[b]).norm())  # noqa: E731
    assert dist((0, 0), (0, 1)) < dist((0, 0), (0, 4)) and dist((0, 0), (1, 0)) < dist((0, 0), (4, 0))
    torch.testing.assert_close(table[1:], sincos_position_embeddings(8, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embeddings(8, 30)
    # Every other weight is the seed's, as without the option.
    for (name, a), (_, b) in zip(default.named_parameters(), model.named_parameters()):
        if "position_embeddings" not in name:
            torch.testing.assert_close(a, b, msg=name)


def test_config_without_seg_token_still_runs_text_only():
    """A plain `MLLMSegConfig(vision_config=..., text_config=...)` (no `[SEG]` id) runs text-only forwards."""
    reference = tiny_config(build_tiny_tokenizer())
    config = MLLMSegConfig(vision_config=reference.vision_config.to_dict(), text_config=reference.text_config.to_dict())
    assert config.seg_token_id is None
    from mllmseg import MLLMSegForConditionalGeneration

    model = MLLMSegForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape[:2] == (1, 4) and torch.isfinite(out.loss) and out.pred_masks is None
