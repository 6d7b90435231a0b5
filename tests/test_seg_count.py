"""Issue 20: `segment(mode="generate")` maps the generated `[SEG]` / `[REJ]` slots to the expressions in order; when
the answer holds more slots (extra `[SEG]` masks are dropped) or fewer (missing ones count as rejected), one warning
per call names every image concerned, with its counts. The tiny model is steered with generate's own `sequence_bias`
(a real generation, no mock)."""
import warnings

import numpy as np
import pytest
from PIL import Image

from mllmseg.tiny import build_processor, build_tiny_model


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model(seed=2)
    return model, build_processor(tok, model.config, system_message="")


def picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8))


def slot_warnings(record):
    return [str(w.message) for w in record if "[SEG]/[REJ] slots" in str(w.message)]


def test_extra_seg_warns_once_with_counts_and_image(setup):
    model, proc = setup
    bias = {(proc.seg_token_id,): 100.0}  # every generated token is a [SEG]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = model.segment(proc, [picture(0), picture(1), picture(2)], [["a"], ["b", "c"], ["d"]],
                                mode="generate", max_new_tokens=3, batch_size=2,
                                generation_config={"sequence_bias": bias})
    assert [r.text.count("[SEG]") for r in results] == [3, 3, 3]
    assert [len(r.masks) for r in results] == [1, 2, 1] and not any(r.rejected.any() for r in results)
    found = slot_warnings(record)
    assert len(found) == 1  # one warning for the call, though it ran in two batches
    message = found[0]
    assert "image 0: 3 slots (3 [SEG], 0 [REJ]) for 1 expressions; the last 2 dropped (2 [SEG] masks lost)" in message
    assert "image 1: 3 slots (3 [SEG], 0 [REJ]) for 2 expressions; the last 1 dropped" in message
    assert "image 2: 3 slots" in message  # numbered across the call's batches


def test_missing_slots_warn_and_count_as_rejected(setup):
    model, proc = setup
    bias = {(proc.end_of_turn_id,): 100.0}  # the answer ends at once: no slot
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = model.segment(proc, picture(3), ["a", "b"], mode="generate", max_new_tokens=3,
                               generation_config={"sequence_bias": bias})
    assert result.rejected.tolist() == [True, True] and not result.masks.any()
    found = slot_warnings(record)
    assert found == ["segment(mode='generate'): the model answered with a different number of [SEG]/[REJ] slots "
                     "than expressions (slots map to expressions in order): image 0: 0 slots (0 [SEG], 0 [REJ]) for 2 "
                     "expressions; the missing 2 counted as rejected"]


def test_matching_slots_do_not_warn(setup):
    model, proc = setup
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = model.segment(proc, picture(4), ["a"], mode="generate", max_new_tokens=1,
                               generation_config={"sequence_bias": {(proc.seg_token_id,): 100.0}})
    assert result.text == "[SEG]" and not result.rejected.any()
    assert slot_warnings(record) == []


def test_a_generated_image_token_is_text_not_an_image(setup):
    """A model may generate `<IMG_CONTEXT>` (a random one does). Generation treats it as text (no image features
    reach it); the masks of the answer's `[SEG]` then come from the prompt's image tokens, instead of the call failing
    with "image tokens and tiles disagree". They equal the masks computed from the same states with the stray token
    replaced, in the bookkeeping only, by an ordinary one: the prompt's tiles, the [SEG]'s own state."""
    model, proc = setup
    image, seg = model.config.image_token_id, proc.seg_token_id
    # an <IMG_CONTEXT> first, then a [SEG] after it (sequence_bias: a token's bias given the one before)
    bias = {(image,): 100.0, (image, image): -300.0, (image, seg): 300.0}
    result = model.segment(proc, picture(4), ["a"], mode="generate", max_new_tokens=2,
                           generation_config={"sequence_bias": bias})
    # (the decoded text skips the special <IMG_CONTEXT>; before the fix this call raised "image tokens and tiles
    # disagree: sample 0 has 17 <IMG_CONTEXT> tokens, not a multiple of 16 per tile")
    assert result.text == "[SEG]" and not result.rejected.any()
    assert result.masks.shape == (1, 64, 80)
