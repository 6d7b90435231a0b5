"""`segment(mode="per_expression")`: each expression answered in its own one-expression conversation, equal to
separate `segment` calls with one expression each (masks, probabilities, `[REJ]` decisions, slot probabilities),
for batches of images of different sizes, single and dynamic tiling, and both mask heads. DSFF computes it with the
image prefix (system turn + image tokens) run once per image and its KV cache reused by the expressions."""
import numpy as np
import pytest
import torch
from PIL import Image

from mllmseg.tiny import build_processor, build_tiny_model

IMAGES = [(300, 100, 1), (90, 120, 2), (200, 210, 3)]
EXPRESSIONS = [["the red circle", "a", "the small green triangle on the left"], ["all shapes"], ["b", "the square"]]


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture(scope="module", params=["dsff", "self1e"])
def setup(request):
    model, tok = build_tiny_model(seed=5, mask_head=request.param)
    # The InternVL2.5 system message (the default): the shared prefix is a system turn plus the image.
    proc = build_processor(tok, model.config)
    with torch.no_grad():  # a [REJ] row that wins at some slots and not at others (single tiling), to compare both
        model.lm_head.weight[proc.rej_token_id] = torch.randn(model.lm_head.weight.shape[1],
                                                              generator=torch.Generator().manual_seed(3))
    return model, proc


def separate_calls(model, proc, images, expr_lists, tiling):
    return [[model.segment(proc, im, [e], tiling=tiling) for e in exprs] for im, exprs in zip(images, expr_lists)]


def assert_equal_to_separate(result, separate):
    probs = torch.cat([r.probabilities for r in separate])
    torch.testing.assert_close(result.probabilities, probs, atol=1e-5, rtol=1e-4)
    # Equal masks wherever the probability is not within rounding (1e-5) of the 0.5 threshold, where a pixel may flip.
    clear = (probs - 0.5).abs() > 1e-5
    assert torch.equal(result.masks[clear], torch.cat([r.masks for r in separate])[clear])
    assert torch.equal(result.rejected, torch.cat([r.rejected for r in separate]))
    torch.testing.assert_close(result.seg_probs, torch.cat([r.seg_probs for r in separate]), atol=1e-5, rtol=1e-4)
    assert result.text == "\n".join(r.text for r in separate)
    assert result.expressions == [e for r in separate for e in r.expressions]


@pytest.mark.parametrize("tiling", ["single", "dynamic"])
def test_per_expression_equals_separate_calls(setup, tiling):
    model, proc = setup
    images = [picture(*spec) for spec in IMAGES]
    results = model.segment(proc, images, EXPRESSIONS, mode="per_expression", tiling=tiling, batch_size=2)
    if tiling == "dynamic":
        tiles = [int(proc.image_processor(im, tiling="dynamic")["num_tiles"][0]) for im in images]
        assert len(set(tiles)) > 1 and max(tiles) > 1, tiles  # several prefix lengths in one batch
    for result, separate in zip(results, separate_calls(model, proc, images, EXPRESSIONS, tiling)):
        assert_equal_to_separate(result, separate)
    if tiling == "single":
        assert results[0].rejected.tolist() == [True, True, False]  # both decisions occur
    # The mode answers differently from the packed conversation of `fast` (each expression sees only itself).
    packed = model.segment(proc, images[0], EXPRESSIONS[0], tiling=tiling)
    assert not torch.allclose(packed.probabilities, results[0].probabilities, atol=1e-3)


def test_per_expression_runs_vit_once_per_image_and_shares_the_prefix():
    """DSFF: one ViT pass over the batch's tiles; the LLM runs on the system turn once, on each image's prefix once
    and on the expressions' suffixes, fewer tokens than the separate conversations hold."""
    model, tok = build_tiny_model(seed=5)
    proc = build_processor(tok, model.config)
    images = [picture(*spec) for spec in IMAGES[:2]]
    vit_tiles, llm_tokens = [], []
    hooks = [model.model.vision_tower.register_forward_hook(lambda m, args, out: vit_tiles.append(out.last_hidden_state.shape[0])),
             model.model.language_model.register_forward_hook(
                 lambda m, args, out: llm_tokens.append(out.last_hidden_state.shape[:2].numel()))]
    try:
        model.segment(proc, images, EXPRESSIONS[:2], mode="per_expression")
    finally:
        for hook in hooks:
            hook.remove()
    assert vit_tiles == [2]
    prompts = [proc.segmentation_prompt([e]) for exprs in EXPRESSIONS[:2] for e in exprs]
    conversations = proc(images=[im for im, exprs in zip(images, EXPRESSIONS[:2]) for _ in exprs],
                         text=[q for q, _ in prompts], answers=[a for _, a in prompts])
    separate_tokens = int(conversations["attention_mask"].sum())
    image_tokens = model.config.tokens_per_tile
    system = int((conversations["input_ids"][0] == model.config.image_token_id).nonzero().min()) - 1
    assert system > 100  # the InternVL2.5 system message: a long prefix common to every conversation
    assert len(llm_tokens) == 3  # the system turn, the 2 image prefixes on it, the 4 suffixes (one tile count)
    assert llm_tokens[0] == system
    # 4 conversations of 2 images: the system turn is run once instead of 4 times, each image's tokens once (the
    # suffixes are right-padded to the longest, which the count includes).
    assert llm_tokens[1] >= 2 * image_tokens and sum(llm_tokens) < separate_tokens - 3 * system


def test_per_expression_mode_is_validated():
    model, tok = build_tiny_model(seed=5)
    proc = build_processor(tok, model.config)
    with pytest.raises(ValueError, match=r"mode must be one of \('fast', 'per_expression', 'generate'\), got 'shared'"):
        model.segment(proc, picture(50, 50, 0), ["a"], mode="shared")
