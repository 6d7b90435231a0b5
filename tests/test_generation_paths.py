"""The generation paths transformers offers, against transformers' own InternVLForConditionalGeneration with the same
weights where no `[SEG]` is involved: tuples (`return_dict=False`), image tokens without pixels, beams, sampling and
`num_return_sequences` (also with a `[SEG]` in the prompt, where masks are computed), chat with beams, the masks of
every returned sequence (`compute_sequence_masks`), `return_dict_in_generate` outputs, the compiled decoding step
(no graph break, eager's tokens) and fast mode's LM head on the slot rows only."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CompileConfig, InternVLConfig, InternVLForConditionalGeneration, LogitsProcessor,
                          LogitsProcessorList)

from mllmseg.tiny import build_processor, build_tiny_model

from ._models import batch_inputs, image_text
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
def test_generate_with_seg_in_the_prompt_decodes_no_masks(pair, kwargs):
    """A `[SEG]` in the prompt (a multi-turn history): generate() expands the samples for beams / several sequences
    and decodes no masks (it returns none; masks of answers come from `chat(return_masks=True)` or
    `compute_sequence_masks`). Before, its prefill decoded them, and a multi-tile prompt without `tile_grids` stopped
    there (`tests/test_chat_arguments.py`). A plain forward over the same prompt still predicts them."""
    model, _, tok = pair
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG]. And"), (1, "Sure, [SEG], [SEG]. And")])
    with torch.no_grad():
        reference = model(**inputs).pred_masks
    assert [m.shape[0] for m in reference] == [1, 2]
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out.pred_masks))
    try:
        out = model.generate(**inputs, max_new_tokens=3, pad_token_id=tok.pad_token_id, **kwargs)
    finally:
        handle.remove()
    assert out.shape[0] == 2 * kwargs.get("num_return_sequences", 1)
    assert seen and all(masks is None for masks in seen)


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


class ForceAtSteps(LogitsProcessor):
    """Forces `token` at the given generation steps (0 = the first new token) on every row; free elsewhere, so beams
    and samples still differ between the forced steps."""

    def __init__(self, token, steps, prompt_length):
        self.token, self.steps, self.prompt_length = token, set(steps), prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length not in self.steps:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token] = 0.0
        return forced


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def separate_forward_masks(model, inputs, sequence, source, eos_id):
    """The masks of one returned sequence from a forward of its own: sample `source`'s unpadded prompt + the answer up
    to its first end-of-turn token, with `source`'s tiles only."""
    prompt_len = inputs["input_ids"].shape[1]
    prompt = inputs["input_ids"][source][inputs["attention_mask"][source].bool()]
    answer = sequence[prompt_len:].tolist()
    answer = answer[: answer.index(eos_id) + 1] if eos_id in answer else answer
    tiles = inputs["num_tiles"].tolist()
    first = sum(tiles[:source])
    with torch.no_grad():
        out = model(input_ids=torch.cat([prompt, torch.tensor(answer)])[None],
                    pixel_values=inputs["pixel_values"][first : first + tiles[source]],
                    tile_grids=inputs["tile_grids"][source : source + 1])
    return out.pred_masks[0]


@pytest.mark.parametrize("mask_head, tiling, kwargs", [
    ("dsff", "dynamic", dict(num_beams=3, num_return_sequences=2)),
    ("dsff", "single", dict(do_sample=True, top_k=5, num_return_sequences=2)),
    ("self1e", "single", dict(num_beams=2, num_return_sequences=2)),
])
def test_compute_sequence_masks_gives_each_returned_sequence_its_own_masks(mask_head, tiling, kwargs):
    """`generate(..., return_dict_in_generate=True)` with several sequences per sample, each with generated `[SEG]`s:
    `compute_sequence_masks` maps every returned sequence to its source sample (its image, its tiles) and gives the
    masks a forward over that sequence alone gives (SELF1E: its dual-perception pass)."""
    model, tok = build_tiny_model(seed=3, mask_head=mask_head)
    proc = build_processor(tok, model.config)
    inputs = proc(images=[picture(300, 100, 1), picture(90, 120, 2)],
                  text=["Please segment the red circle.", "Segment it."], tiling=tiling, padding_side="left")
    if tiling == "dynamic":
        assert len(set(inputs["num_tiles"].tolist())) > 1  # the case under test: samples of different tile counts
    seg, eos = tok.convert_tokens_to_ids("[SEG]"), tok.convert_tokens_to_ids("<|im_end|>")
    force = ForceAtSteps(seg, steps=(1, 4), prompt_length=inputs["input_ids"].shape[1])
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, logits_processor=LogitsProcessorList([force]),
                         return_dict_in_generate=True, eos_token_id=eos, pad_token_id=tok.pad_token_id, **kwargs)
    masks = model.compute_sequence_masks(out.sequences, **inputs, eos_token_id=eos)
    per_sample = kwargs["num_return_sequences"]
    assert len(masks) == out.sequences.shape[0] == 2 * per_sample
    for i, sequence in enumerate(out.sequences):
        expected = separate_forward_masks(model, inputs, sequence, i // per_sample, eos)
        assert expected.shape[0] == 2  # the two forced [SEG]
        torch.testing.assert_close(masks[i], expected, atol=1e-5, rtol=1e-4)
    # The returned sequences of one sample differ; where they differ before the last [SEG], so do its masks (a
    # mix-up between them would show).
    before_last_seg = inputs["input_ids"].shape[1] + 4
    compared = 0
    for i, j in ((0, 1), (per_sample, per_sample + 1)):
        assert not torch.equal(out.sequences[i], out.sequences[j])
        if not torch.equal(out.sequences[i, :before_last_seg], out.sequences[j, :before_last_seg]):
            assert not torch.allclose(masks[i][1], masks[j][1], atol=1e-4)
            compared += 1
    assert compared


def test_compute_sequence_masks_refuses_sequences_of_other_prompts(pair):
    model, _, tok = pair
    inputs = batch_inputs(model, tok, [(1, "Sure, [SEG]."), (1, "Sure, [SEG], [SEG].")])
    sequences = inputs["input_ids"].flip(0)  # rows of the other sample
    with pytest.raises(ValueError, match="sequence 0 does not start with the prompt of sample 0"):
        model.compute_sequence_masks(sequences, **inputs)
    with pytest.raises(ValueError, match=r"sequences of shape \(3, \d+\) for a batch of 2 prompts"):
        model.compute_sequence_masks(inputs["input_ids"][[0, 0, 1]], **inputs)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=2, num_return_sequences=2)])
def test_generate_dict_outputs_equal_internvl(pair, kwargs):
    """`return_dict_in_generate` with scores, logits and hidden states: the same fields, shapes and values as
    InternVL's (beams: also `sequences_scores` and `beam_indices`)."""
    model, internvl, tok = pair
    inputs = batch_inputs(model, tok, [(1, "Describe"), (1, "the red")])
    settings = dict(max_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=-1, return_dict_in_generate=True,
                    output_scores=True, output_logits=True, output_hidden_states=True, **kwargs)
    ours, theirs = model.generate(**inputs, **settings), internvl.generate(**inputs, **settings)
    assert type(ours).__name__ == type(theirs).__name__
    assert torch.equal(ours.sequences, theirs.sequences)
    for field in ("scores", "logits"):
        assert len(getattr(ours, field)) == len(getattr(theirs, field)) == 4
        for a, b in zip(getattr(ours, field), getattr(theirs, field)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for step_ours, step_theirs in zip(ours.hidden_states, theirs.hidden_states):
        assert len(step_ours) == len(step_theirs) == model.config.text_config.num_hidden_layers + 1
        for a, b in zip(step_ours, step_theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if "num_beams" in kwargs:
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(ours.beam_indices, theirs.beam_indices)


def left_padded_inputs(model, tok, texts, seed=0):
    """One tile per text, prompts left-padded (generation)."""
    enc = tok([image_text(model, 1, t) for t in texts], return_tensors="pt", padding=True, padding_side="left")
    size = model.config.image_size
    enc["pixel_values"] = torch.randn(len(texts), 3, size, size, generator=torch.Generator().manual_seed(seed))
    return enc


def decode_step_kwargs(model, inputs, **settings):
    """The keyword arguments of the second decoding step of a static-cache generation (the cache as it was then)."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(copy.deepcopy(k)), with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=3, cache_implementation="static", **settings)
    finally:
        hook.remove()
    return calls[2]


@pytest.mark.parametrize("step_token", ["free", "[SEG]"])
def test_decoding_step_traces_without_graph_breaks(pair, step_token):
    """`torch._dynamo.explain` over our forward at a static-cache decoding step: one graph, no break, also when the
    step's token is a `[SEG]` (a decoding step makes no masks: no image tokens in it)."""
    model, _, tok = pair
    inputs = left_padded_inputs(model, tok, ["Sure, [SEG]. And", "the red"])
    settings = dict(pad_token_id=tok.pad_token_id, eos_token_id=-1)
    if step_token == "[SEG]":
        force = ForceAtSteps(model.config.seg_token_id, steps=(0, 1), prompt_length=inputs["input_ids"].shape[1])
        settings["logits_processor"] = LogitsProcessorList([force])
    step = decode_step_kwargs(model, inputs, **settings)
    assert step["input_ids"].shape == (2, 1) and "pixel_values" not in step
    if step_token == "[SEG]":
        assert (step["input_ids"] == model.config.seg_token_id).all()
    explanation = torch._dynamo.explain(model.forward)(**step)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_decoding_step_gives_eager_tokens(pair):
    """transformers' automatic compilation of the decoding step (`cache_implementation="static"` + `compile_config`;
    `_compile_all_devices` lets it run on CPU, as transformers' own tests do), `fullgraph=True` (a graph break would
    raise): the tokens of eager decoding, without and with `[SEG]` (in the prompt, so the prefill makes masks, and
    generated), and InternVL's tokens where there is none. One compiled model for all cases (same shapes)."""
    model, internvl, tok = pair
    texts = ["Describe the red", "the red"]
    plain = left_padded_inputs(model, tok, texts)
    with_seg = {k: v.clone() for k, v in plain.items()}
    with_seg["input_ids"][:, -2] = model.config.seg_token_id  # same length: the compiled graph is reused
    prompt_len = plain["input_ids"].shape[1]
    force = LogitsProcessorList([ForceAtSteps(model.config.seg_token_id, steps=(1,), prompt_length=prompt_len)])
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    base = dict(max_new_tokens=5, cache_implementation="static", pad_token_id=tok.pad_token_id, eos_token_id=-1,
                do_sample=False)
    try:
        compiled = model.generate(**plain, **base, compile_config=compile_config)
        assert hasattr(model, "_compiled_call")  # the compiled call was made, not silently skipped
        assert torch.equal(compiled, model.generate(**plain, **base, disable_compile=True))
        assert torch.equal(compiled, internvl.generate(**plain, **base, disable_compile=True))

        compiled = model.generate(**with_seg, **base, logits_processor=force, compile_config=compile_config)
        assert (compiled[:, prompt_len + 1] == model.config.seg_token_id).all()  # the next step's input is a [SEG]
        assert torch.equal(compiled, model.generate(**with_seg, **base, logits_processor=force, disable_compile=True))
    finally:
        for name in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, name):
                delattr(model, name)


def test_fast_mode_applies_the_lm_head_to_the_slot_rows_only():
    """`segment`'s fast mode reads only the logits that predict each slot: the full-vocabulary head runs on B + M rows
    (the last position of each sample, then the M slot states), not B * L; results equal the full-logits forward's."""
    model, tok = build_tiny_model(seed=3)
    proc = build_processor(tok, model.config)
    images = [picture(300, 100, 1), picture(90, 120, 2)]
    expr_lists = [["the red circle", "the square"], ["all shapes"]]
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0][..., 0].numel()))
    try:
        results = model.segment(proc, images, expr_lists)
    finally:
        hook.remove()
    prompts = [proc.segmentation_prompt(e) for e in expr_lists]
    batch = proc(images=images, text=[q for q, _ in prompts], answers=[a for _, a in prompts], tiling="single")
    b, length = batch["input_ids"].shape
    assert sum(rows) == b + 3 < b * length
    with torch.no_grad():
        full = model(**batch, logits_to_keep=0)
    assert full.logits.shape[1] == length
    expected = proc.post_process_segmentation(full, target_sizes=batch["original_sizes"], expressions=expr_lists,
                                              input_ids=batch["input_ids"])
    for got, want in zip(results, expected):
        assert torch.equal(got.probabilities, want.probabilities) and torch.equal(got.masks, want.masks)
        assert torch.equal(got.rejected, want.rejected) and got.text == want.text
        torch.testing.assert_close(got.seg_probs, want.seg_probs, atol=1e-6, rtol=1e-5)
