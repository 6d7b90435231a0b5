import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from mllmseg.remote_code.conversation_mllmseg import evaluation_prompt
from mllmseg.tiny import build_processor, build_tiny_model


class ForceSequence(LogitsProcessor):
    """Forces generation to emit exactly `token_ids` (then EOS): a random tiny model never emits [SEG] itself."""

    def __init__(self, token_ids, prompt_length, eos_id):
        self.token_ids, self.prompt_length, self.eos_id = list(token_ids), prompt_length, eos_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        target = self.token_ids[step] if step < len(self.token_ids) else self.eos_id
        forced = torch.full_like(scores, float("-inf"))
        forced[:, target] = 0.0
        return forced


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model(seed=3)
    return model, tok, build_processor(tok, model.config)


def image(w=120, h=90, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_segment_fast_returns_masks_at_original_size(setup):
    model, tok, proc = setup
    result = model.segment(proc, image(), ["the red circle", "the square"], return_rle=True)
    assert result.expressions == ["the red circle", "the square"]
    assert result.masks.shape == (2, 90, 120) and result.masks.dtype == torch.bool
    assert result.boxes.shape == (2, 4) and result.scores.shape == (2,) and result.rejected.dtype == torch.bool
    assert result.text == "Sure,the red circle:[SEG], the square:[SEG]."
    assert len(result.rle) == 2 and result.rle[0]["size"] == [90, 120]
    # The masks are the model's own [SEG] outputs, resized: equal to a plain forward's pred_masks post-processed.
    q, a = evaluation_prompt(["the red circle", "the square"])
    batch = proc(images=[image()], text=[q], answers=[a], tiling="single")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    probs, masks = proc.post_process_masks(out.pred_masks[0], (90, 120))
    torch.testing.assert_close(result.probabilities, probs)
    assert torch.equal(result.masks, masks & ~result.rejected[:, None, None])


def test_fast_and_generate_modes_give_the_same_masks(setup):
    model, tok, proc = setup
    exprs = ["the red circle", "the blue square"]
    fast = model.segment(proc, image(), exprs, mode="fast")
    answer_ids = tok(fast.text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    q, _ = evaluation_prompt(exprs)
    prompt_len = proc(images=[image()], text=[q])["input_ids"].shape[1]
    forcing = LogitsProcessorList([ForceSequence(answer_ids, prompt_len, tok.convert_tokens_to_ids("<|im_end|>"))])
    generated = model.segment(proc, image(), exprs, mode="generate",
                              generation_config={"logits_processor": forcing}, max_new_tokens=len(answer_ids) + 2)
    assert generated.text == fast.text
    assert generated.rejected.tolist() == [False, False]
    torch.testing.assert_close(generated.probabilities, fast.probabilities, atol=2e-4, rtol=1e-3)


def test_generate_mode_counts_generated_seg_and_rej(setup):
    model, tok, proc = setup
    q, _ = evaluation_prompt(["a", "b"])
    prompt_len = proc(images=[image()], text=[q])["input_ids"].shape[1]
    answer = tok("Sure,a:[REJ], b:[SEG].<|im_end|>", add_special_tokens=False)["input_ids"]
    forcing = LogitsProcessorList([ForceSequence(answer, prompt_len, tok.convert_tokens_to_ids("<|im_end|>"))])
    result = model.segment(proc, image(), ["a", "b"], mode="generate", generation_config={"logits_processor": forcing})
    assert result.rejected.tolist() == [True, False]
    assert not result.masks[0].any() and result.text == "Sure,a:[REJ], b:[SEG]."


def test_chat_is_internvl_compatible_and_returns_masks_from_generation(setup):
    model, tok, proc = setup
    pixel_values = proc.image_processor(image(), tiling="single")["pixel_values"]
    question = "Please segment the red circle."
    prompt = proc.render(proc.expand_image_placeholders("<image>\n" + question, [1]))
    prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer = tok("Sure, [SEG].<|im_end|>", add_special_tokens=False)["input_ids"]
    config = dict(max_new_tokens=10, logits_processor=LogitsProcessorList(
        [ForceSequence(answer, prompt_len, tok.convert_tokens_to_ids("<|im_end|>"))]))
    response, history, masks = model.chat(tok, pixel_values, question, config, history=None, return_history=True,
                                          return_masks=True)
    assert response == "Sure, [SEG]." and history == [("<image>\n" + question, response)]
    assert masks.shape == (1, 112, 112)
    # Same masks as a teacher-forced forward over prompt + answer: no second prefill was needed to get them.
    ids = torch.tensor([tok(prompt + "Sure, [SEG].", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values)
    torch.testing.assert_close(masks, out.pred_masks[0], atol=2e-4, rtol=1e-3)
    # Plain InternVL call shape: a string back; a second turn reuses the history.
    plain = model.chat(tok, pixel_values, question, dict(max_new_tokens=3))
    assert isinstance(plain, str)
    response2, history2 = model.chat(tok, pixel_values, "And now?", dict(max_new_tokens=3), history=history,
                                     return_history=True)
    assert len(history2) == 2 and history2[0] == history[0]
    responses = model.batch_chat(tok, torch.cat([pixel_values, pixel_values]), ["a?", "b?"], dict(max_new_tokens=3),
                                 num_patches_list=[1, 1])
    assert len(responses) == 2 and all(isinstance(r, str) for r in responses)


def test_batches_with_different_tile_counts(setup):
    model, tok, proc = setup
    check_batch_equals_per_image_runs(model, proc)


def check_batch_equals_per_image_runs(model, proc):
    """Images with 1, several and dynamic tile counts in one `segment` call give the per-image results."""
    images = [image(120, 90), image(400, 100, seed=1), image(50, 50, seed=2)]
    batched = model.segment(proc, images, [["a", "b"], "c", ["d"]], tiling="dynamic")
    assert [r.masks.shape for r in batched] == [(2, 90, 120), (1, 100, 400), (1, 50, 50)]
    for img, exprs, res in zip(images, [["a", "b"], ["c"], ["d"]], batched):
        alone = model.segment(proc, img, exprs, tiling="dynamic")
        torch.testing.assert_close(res.probabilities, alone.probabilities, atol=2e-4, rtol=1e-3)


def test_dynamic_tiling_geometry_maps_tile_masks_back_to_the_image(setup, monkeypatch):
    """A 2:1 image whose left third is red (the red edge falls inside a tile): tile masks that mark red pixels of each tile must land on the red
    third of the original image after stitching (thumbnail left out) and resizing."""
    model, tok, proc = setup
    w, h = 360, 180
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[:, :120] = (255, 0, 0)
    array[:, 120:] = (0, 0, 255)
    img = Image.fromarray(array)
    feats = proc.image_processor(img, tiling="dynamic")
    rows, cols = feats["tile_grids"][0].tolist()
    assert cols > 1 and int(feats["num_tiles"][0]) == rows * cols + 1  # a grid plus the thumbnail
    red_logits = torch.where(feats["pixel_values"][:, 0] > feats["pixel_values"][:, 2], 20.0, -20.0)  # per tile

    def decode(fused, seg_embeddings):  # the decoder's rows are the sample's grid tiles, in order
        assert fused.shape[0] == rows * cols
        return red_logits[: rows * cols]

    monkeypatch.setattr(model.mask_decoder, "decode", decode)
    result = model.segment(proc, img, "the red part", tiling="dynamic")
    truth = torch.zeros(h, w, dtype=torch.bool)
    truth[:, :120] = True
    iou = (result.masks[0] & truth).sum() / (result.masks[0] | truth).sum()
    assert float(iou) > 0.98
    assert result.boxes[0].tolist()[0] == 0 and abs(result.boxes[0].tolist()[2] - 119) <= 2


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_are_converted(setup, mode):
    model, tok, proc = setup
    img = image(64, 48).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img).astype(np.uint16) * 257))
    result = model.segment(proc, img, "x")
    assert result.masks.shape == (1, 48, 64)


def test_bad_inputs_give_clear_errors(setup, tmp_path):
    model, tok, proc = setup
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(Exception, match="broken.jpg"):
        model.segment(proc, str(corrupt), "x")
    with pytest.raises(ValueError, match="is empty"):
        model.segment(proc, image(), ["ok", "   "])
    with pytest.raises(ValueError, match="got 2 images but 1 expression lists"):
        model.segment(proc, [image(), image()], [["a"]])
    with pytest.raises(ValueError, match="over the limit"):
        model.segment(proc, image(), "word " * 5000)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.segment(proc, image(), "x", mode="slow")
    big = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(big)
    monkeypatch_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with pytest.raises(Exception, match="big.png"):
            model.segment(proc, str(big), "x")
    finally:
        Image.MAX_IMAGE_PIXELS = monkeypatch_limit


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch_size=-1), ValueError, "batch_size must be a positive integer, got -1"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
    (dict(threshold=-1), ValueError, "threshold must be a probability strictly between 0 and 1, got -1"),
    (dict(threshold=2), ValueError, "threshold must be"),
    (dict(threshold=float("nan")), ValueError, "threshold must be"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be"),
])
def test_segment_arguments_are_validated(setup, kwargs, error, match):
    """These used to give [] (batch_size=-1) or all-True / all-False masks (threshold -1 / 2 / NaN)."""
    model, tok, proc = setup
    with pytest.raises(error, match=match):
        model.segment(proc, image(), ["the red circle"], **kwargs)


@pytest.mark.parametrize("expression", [None, b"the circle", 3])
def test_segment_refuses_non_string_expressions(setup, expression):
    model, tok, proc = setup
    with pytest.raises(TypeError, match="image 0, expression 1: expected a string"):
        model.segment(proc, image(), ["the red circle", expression])


def test_phone_photo_orientation_is_the_viewers(setup, tmp_path):
    """A JPEG stored 200 x 100 with EXIF Orientation=6 (rotate 90 degrees to view) is 100 wide and 200 high on screen:
    masks and boxes come back in that frame, from a path and from the opened PIL image alike."""
    model, tok, proc = setup
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif)
    for source in (path, Image.open(path)):
        result = model.segment(proc, source, ["the red circle"])
        assert result.masks.shape == (1, 200, 100)
    assert tuple(proc(images=Image.open(path), text="x")["original_sizes"][0].tolist()) == (200, 100)
