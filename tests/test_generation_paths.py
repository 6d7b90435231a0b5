"""The generation paths transformers offers, against transformers' own InternVLForConditionalGeneration with the same
weights where no `[SEG]` is involved: tuples (`return_dict=False`), image tokens without pixels, beams, sampling and
`num_return_sequences` (also with a `[SEG]` in the prompt, where masks are computed), and chat with beams."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration, LogitsProcessorList

from mllmseg.tiny import build_processor, build_tiny_model

from ._models import batch_inputs
from .test_inference import ForceSequence


@pytest.fixture(scope="module")
def pair():
    """(ours, transformers' InternVL with the same weights, tokenizer)."""
    model, tok = build_tiny_model(seed=5)
    fields = model.config.to_dict()
    keep = set(InternVLConfig().to_dict())
    config = InternVLConfig(**{k: v for k, v in fields.items() if k in keep and k not in ("model_type", "architectures")})
    internvl = InternVLForConditionalGeneration(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_decoder.")}
    missing, unexpected = internvl.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" not in m for m in missing) and not missing, (missing, unexpected)
    return model, internvl, tok


def test_return_dict_false_gives_tuples_like_internvl(pair):
    model, internvl, tok = pair
    inputs = batch_inputs(model, tok, [(1, "a red circle")])
    with torch.no_grad():
        ours, theirs = model(**inputs, return_dict=False), internvl(**inputs, return_dict=False)
        full = model(**inputs)
    assert isinstance(ours, tuple) and isinstance(theirs, tuple)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[0], full.logits, atol=0, rtol=0)
    model.config.return_dict = False
    try:
        with torch.no_grad():
            assert isinstance(model(**inputs), tuple)
    finally:
        model.config.return_dict = True


def test_image_tokens_without_pixels_are_text_as_in_internvl(pair):
    """A generated `<IMG_CONTEXT>`, or an assistant model's prefill, comes without image inputs: text, no error."""
    model, internvl, tok = pair
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG].")])
    del inputs["pixel_values"]
    with torch.no_grad():
        ours, theirs = model(**inputs), internvl(**inputs)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-4)
    assert ours.pred_masks is None


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=2), dict(num_beams=3, num_return_sequences=2),
                                    dict(do_sample=True, num_return_sequences=2, top_k=5),
                                    dict(prefill_chunk_size=8), dict(prompt_lookup_num_tokens=3),
                                    dict(cache_implementation="static")])
def test_generate_equals_internvl_on_every_decoding_strategy(pair, kwargs):
    model, internvl, tok = pair
    specs = [(1, "Describe"), (1, "the red")][: 1 if "prompt_lookup_num_tokens" in kwargs else 2]  # (batch 1 only)
    inputs = batch_inputs(model, tok, specs)
    settings = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=-1, **kwargs)
    torch.manual_seed(0)
    ours = model.generate(**inputs, **settings)
    torch.manual_seed(0)
    theirs = internvl.generate(**inputs, **settings)
    assert torch.equal(ours, theirs)


def test_assisted_decoding_equals_greedy(pair):
    """The assistant's prefill gets no image inputs (its image tokens are text); greedy assisted decoding gives the
    target model's own greedy tokens."""
    model, _, tok = pair
    assistant, _ = build_tiny_model(tok, seed=6)
    inputs = batch_inputs(model, tok, [(1, "Describe the red")])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=-1)
    assert torch.equal(model.generate(**inputs, assistant_model=assistant, **settings), model.generate(**inputs, **settings))


@pytest.mark.parametrize("kwargs", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                    dict(do_sample=True, num_return_sequences=2)])
def test_generate_with_seg_in_the_prompt_expands_the_vit_states(pair, kwargs):
    """A `[SEG]` in the prompt (a multi-turn history) makes the prefill compute masks; generate expands the samples
    for beams / several sequences, and the decoder's ViT states follow."""
    model, _, tok = pair
    # One tile per sample: transformers before 5.2x repeated the tiles of a multi-tile image one by one ([A, A, B, B])
    # rather than as a group, which misplaces the image features for the LLM itself; not ours to fix.
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG]. And"), (1, "Sure, [SEG], [SEG]. And")])
    with torch.no_grad():
        reference = model(**inputs).pred_masks
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out.pred_masks) if out.pred_masks else None)
    try:
        out = model.generate(**inputs, max_new_tokens=3, pad_token_id=tok.pad_token_id, **kwargs)
    finally:
        handle.remove()
    assert out.shape[0] == 2 * kwargs.get("num_return_sequences", 1)
    times = kwargs["num_beams"] if "num_beams" in kwargs else kwargs["num_return_sequences"]  # beams, or samples
    prefill = seen[0]
    assert len(prefill) == 2 * times
    for j, masks in enumerate(prefill):  # expanded sample j is a copy of sample j // times
        torch.testing.assert_close(masks, reference[j // times], atol=1e-5, rtol=1e-4)


def test_chat_with_beams_returns_the_masks_of_the_returned_answer():
    model, tok = build_tiny_model(seed=3)
    proc = build_processor(tok, model.config)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    pixel_values = proc.image_processor(image, tiling="single")["pixel_values"]
    question = "Please segment the red circle."
    prompt = proc.render(proc.expand_image_placeholders("<image>\n" + question, [1]))
    prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer = tok("Sure, [SEG].<|im_end|>", add_special_tokens=False)["input_ids"]
    force = ForceSequence(answer, prompt_len, tok.convert_tokens_to_ids("<|im_end|>"))
    config = dict(max_new_tokens=10, num_beams=2, logits_processor=LogitsProcessorList([force]))
    response, masks = model.chat(proc, pixel_values, question, config, return_masks=True)
    assert response == "Sure, [SEG]."
    ids = torch.tensor([tok(prompt + "Sure, [SEG].", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).pred_masks[0]
    torch.testing.assert_close(masks, expected, atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="num_return_sequences=2: chat and segment return one answer"):
        model.chat(proc, pixel_values, question, dict(max_new_tokens=2, num_return_sequences=2))


def test_serving_hooks_match_internvl_and_the_processor(pair):
    """`_tp_plan` as InternVL's head has it; `_get_num_multimodal_tokens` counts what the processor really inserts."""
    model, internvl, tok = pair
    theirs = getattr(type(internvl), "_tp_plan", None) or {"lm_head": "colwise_gather_output"}  # (5.24 has one)
    assert model._tp_plan["lm_head"] == theirs["lm_head"]
    proc = build_processor(tok, model.config)
    sizes = [(90, 120), (100, 450), (30, 30)]
    data = proc._get_num_multimodal_tokens(image_sizes=sizes, tiling="dynamic")
    for (h, w), n_tokens, n_tiles in zip(sizes, data.num_image_tokens, data.num_image_patches):
        batch = proc(images=Image.new("RGB", (w, h)), text="hi", tiling="dynamic")
        ids = batch["input_ids"][0]
        image_ids = {tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
        assert int(batch["num_tiles"][0]) == n_tiles
        assert sum(int(i) in image_ids for i in ids) == n_tokens
