"""The inference fast paths give the outputs of the plain computations they replace (benchmarks/ times them).

* packed expressions: `segment` fuses each tile's image features once and reuses them for every `[SEG]`; the plain
  way runs the whole decoder per `[SEG]`.
* masks from generation: `segment(mode="generate")` takes the `[SEG]` states recorded while generating; the plain
  (LISA-style) way re-runs a teacher-forced forward over prompt + answer.
* one LM-head call: fast mode's forward (`logits_to_keep=1`) runs the head once over the last positions and the
  `[SEG]` slot rows together; logits and slot logits equal the full-logits forward's.
* bfloat16 on CPU: the decoder's DySample upsampler gives finite values equal to float32's up to rounding.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from mllmseg.remote_code.conversation_mllmseg import evaluation_prompt
from mllmseg.remote_code.mask_decoder_mllmseg import DySampleUpsampler
from mllmseg.tiny import build_processor, build_tiny_model

class ForceAnswer(LogitsProcessor):
    """Forces `ids` then EOS on every row, from the first generated token on."""

    def __init__(self, ids, eos_id):
        self.ids, self.start = list(ids) + [eos_id], None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(input_ids.shape[1] - self.start, len(self.ids) - 1)]] = 0.0
        return forced


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model(seed=5)
    return model, tok, build_processor(tok, model.config, system_message="")


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def plain_masks(model, proc, images, expr_lists, answers, tiling):
    """Teacher-forced forward per image, then the whole decoder (fusion included) run on its own for every [SEG] and
    every grid tile, tiles stitched by hand. Returns per image the mask probabilities at the original size."""
    out = []
    grid = model.config.vision_grid
    size = model.config.image_size
    for img, exprs, answer in zip(images, expr_lists, answers):
        batch = proc(images=[img], text=[evaluation_prompt(exprs)[0]], answers=[answer], tiling=tiling)
        ids, pixel_values = batch["input_ids"], batch["pixel_values"]
        with torch.no_grad():
            hidden = model.model(input_ids=ids, pixel_values=pixel_values).last_hidden_state
            vit = model.get_image_features(pixel_values, return_dict=True).last_hidden_state[:, -grid * grid :]
            llm_image = model.llm_image_states(ids, hidden)
            seg_emb, _ = model.seg_embeddings(ids, hidden)
            rows, cols = (int(v) for v in batch["tile_grids"][0])
            maps = []
            for s in range(seg_emb.shape[0]):
                canvas = torch.zeros(rows * size, cols * size)
                for t in range(rows * cols):
                    r, c = divmod(t, cols)
                    logit = model.mask_decoder(vit[t : t + 1], llm_image[t : t + 1], seg_emb[s : s + 1])[0]
                    canvas[r * size : (r + 1) * size, c * size : (c + 1) * size] = logit
                maps.append(canvas)
        probs, _ = proc.post_process_masks(torch.stack(maps), batch["original_sizes"][0])
        out.append(probs)
    return out


def test_packed_segment_equals_plain_per_seg_decoding(setup):
    """Several images in one call, different numbers of expressions and of tiles (dynamic tiling): the shared image
    fusion must hand every [SEG] its own image's tiles, in order."""
    model, tok, proc = setup
    images = [picture(300, 100, 1), picture(90, 120, 2), picture(200, 210, 3)]
    expr_lists = [["the red circle", "the square"], ["all shapes"], ["a", "the thing on the left", "b"]]
    results = model.segment(proc, images, expr_lists, tiling="dynamic")
    tiles = [int(proc.image_processor(im, tiling="dynamic")["num_tiles"][0]) for im in images]
    assert len(set(tiles)) > 1 and max(tiles) > 1, tiles  # the case under test: several, different tile counts
    plain = plain_masks(model, proc, images, expr_lists, [evaluation_prompt(e)[1] for e in expr_lists], "dynamic")
    for result, probs in zip(results, plain):
        assert result.probabilities.shape == probs.shape
        torch.testing.assert_close(result.probabilities, probs, atol=1e-5, rtol=1e-4)


def test_generate_mode_equals_generate_then_reforward(setup):
    """Batched generation (left-padded prompts of different lengths, different tile counts): masks from the states
    recorded while generating equal a second, teacher-forced forward over prompt + generated answer."""
    model, tok, proc = setup
    images = [picture(300, 100, 4), picture(100, 100, 5)]
    expr_lists = [["the big blue square on the left side", "the small red circle"], ["a", "b"]]
    answer = "Sure,a:[SEG], b:[SEG]."
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    forcing = LogitsProcessorList([ForceAnswer(tok(answer, add_special_tokens=False)["input_ids"], eos)])
    results = model.segment(proc, images, expr_lists, mode="generate", tiling="dynamic",
                            generation_config={"logits_processor": forcing}, max_new_tokens=40)
    plain = plain_masks(model, proc, images, expr_lists, [answer, answer], "dynamic")
    for result, probs in zip(results, plain):
        assert result.text == answer and result.rejected.tolist() == [False, False]
        torch.testing.assert_close(result.probabilities, probs, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("keep", [1, 3, "positions"])
def test_one_lm_head_call_gives_the_full_forwards_logits(setup, keep):
    """Issue 21: the head's weight (vocab x T) is read once per forward, over the kept positions and the slot rows
    together, and the split result equals the logits of a forward that keeps every position."""
    model, tok, proc = setup
    images = [picture(300, 100, 1), picture(90, 120, 2)]
    prompts = [proc.segmentation_prompt(e) for e in (["the red circle", "the square"], ["all shapes"])]
    batch = proc(images=images, text=[q for q, _ in prompts], answers=[a for _, a in prompts], tiling="single")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    b, length = batch["input_ids"].shape
    kept = torch.tensor([0, 5, length - 1]) if keep == "positions" else torch.arange(length - keep, length)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        with torch.no_grad():
            out = model(**inputs, logits_to_keep=kept if keep == "positions" else keep)
    finally:
        hook.remove()
    assert rows == [b * len(kept) + 3]  # one call: the kept rows of both samples and the 3 slot rows
    with torch.no_grad():
        full = model(**inputs, logits_to_keep=0)
    assert rows == [b * len(kept) + 3]  # the hook is gone
    torch.testing.assert_close(out.logits, full.logits[:, kept], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.seg_logits, full.seg_logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.seg_sample, torch.tensor([0, 0, 1]))
    for got, want in zip(out.pred_masks, full.pred_masks):
        assert torch.equal(got, want)


def test_dysample_bfloat16_on_channel_strided_input():
    """InternVL2.5 widths (1024 channels, 16x16 grid); the input is a transposed token matrix as in the decoder.
    torch's CPU grid_sample returned NaN / 1e38 for such bfloat16 inputs before the upsampler made them contiguous."""
    torch.manual_seed(0)
    up = DySampleUpsampler(1024, scale=2, groups=4).eval()
    tokens = torch.randn(1, 256, 1024)
    x = tokens.transpose(1, 2).reshape(1, 1024, 16, 16)
    assert not x.is_contiguous()
    with torch.no_grad():
        ref = up(x)
        up = up.to(torch.bfloat16)
        low = up(x.to(torch.bfloat16)).float()
        low_contiguous = up(x.to(torch.bfloat16).contiguous()).float()
    assert torch.isfinite(low).all()
    assert torch.equal(low, low_contiguous)
    # bfloat16 sampling coordinates are coarse: close to float32 on average, not element by element.
    assert float((low - ref).abs().mean()) < 0.02 and float((low - ref).abs().max()) < 0.5
