"""`chat` / `batch_chat` check their arguments where they enter: a wrong type, shape, count or value is a TypeError /
ValueError that names the argument, what was expected and what came, never a raw unpack / attribute / index error
from deep inside, and never a silent answer from NaN pixels or a misread tile count (issue 19)."""
import numpy as np
import pytest
import torch

from mllmseg.tiny import build_processor, build_tiny_model

SIZE = 112  # the tiny models' tile size


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model(seed=3)
    assert model.config.image_size == SIZE
    return model, build_processor(tok, model.config)


def tiles(n, channels=3, size=SIZE):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def with_value(t, value):
    t = t.clone()
    t[0, 1, 5, 7] = value
    return t


GEN = dict(max_new_tokens=2)

CHAT_CASES = {
    "3-D pixel_values": (dict(pixel_values=tiles(1)[0]), ValueError,
                         r"pixel_values must have shape \(tiles, 3, 112, 112\), got \(3, 112, 112\)"
                         r".*pixel_values\[None\]"),
    "NumPy pixel_values": (dict(pixel_values=tiles(1).numpy()), TypeError,
                           r"pixel_values must be a torch\.Tensor of shape \(tiles, 3, 112, 112\), got numpy\.ndarray"),
    "a list of tiles": (dict(pixel_values=[tiles(1)[0]]), TypeError, r"pixel_values must be a torch\.Tensor.*got list"),
    "zero tiles": (dict(pixel_values=tiles(0)), ValueError, r"pixel_values has 0 tiles"),
    "one channel": (dict(pixel_values=tiles(1, channels=1)), ValueError,
                    r"pixel_values must have 3 channels \(RGB\), got 1 \(shape \(1, 1, 112, 112\)\)"),
    "wrong tile size": (dict(pixel_values=tiles(1, size=64)), ValueError,
                        r"pixel_values tiles must be 112x112 \(the model's image_size\), got 64x64"),
    "integer pixels": (dict(pixel_values=(tiles(1) * 50).clamp(0, 255).to(torch.uint8)), TypeError,
                       r"pixel_values must be floating point .*normalized.*got torch\.uint8"),
    "NaN pixels": (dict(pixel_values=with_value(tiles(2), float("nan")), num_patches_list=[2]), ValueError,
                   r"pixel_values holds 1 NaN or infinite value"),
    "inf pixels": (dict(pixel_values=with_value(tiles(1), float("inf"))), ValueError,
                   r"pixel_values holds 1 NaN or infinite value"),
    "None question": (dict(question=None), TypeError, r"question must be a string, got NoneType"),
    "bytes question": (dict(question=b"what is it?"), TypeError, r"question must be a string, got bytes"),
    "num_patches_list too large": (dict(num_patches_list=[2]), ValueError,
                                   r"num_patches_list sums to 2 but pixel_values has 1 tiles"),
    "num_patches_list short": (dict(pixel_values=tiles(3), question="<image>\n<image>\nCompare them.",
                                    num_patches_list=[3]), ValueError,
                               r"num_patches_list has 1 entries for 2 images \(<image> placeholders"),
    "num_patches_list long": (dict(pixel_values=tiles(2), num_patches_list=[1, 1]), ValueError,
                              r"num_patches_list has 2 entries for 1 images"),
    "num_patches_list zero entry": (dict(pixel_values=tiles(2), question="<image>\n<image>\nCompare.",
                                         num_patches_list=[0, 2]), ValueError,
                                    r"num_patches_list\[0\] must be a positive integer .*got 0"),
    "num_patches_list float entry": (dict(num_patches_list=[1.0]), ValueError,
                                     r"num_patches_list\[0\] must be a positive integer .*got 1\.0"),
    "num_patches_list an int": (dict(num_patches_list=1), TypeError,
                                r"num_patches_list must be a list of tile counts, one per image, got int"),
    "num_patches_list without pixels": (dict(pixel_values=None, num_patches_list=[1]), ValueError,
                                        r"num_patches_list is given but pixel_values is None"),
    "generation_config not a dict": (dict(generation_config=64), TypeError,
                                     r"generation_config must be a dict of generate\(\) keywords .*got int"),
    "history not pairs": (dict(history=[("only a question",)]), ValueError,
                          r"history\[0\] must be a \(question, answer\) pair of strings, got \('only a question',\)"),
    "history None answer": (dict(history=[("<image>\nq", None)]), ValueError,
                            r"history\[0\] must be a \(question, answer\)"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_refuses_bad_arguments_with_a_clear_error(setup, case):
    model, proc = setup
    changes, error, message = CHAT_CASES[case]
    args = dict(pixel_values=tiles(1), question="What is it?", generation_config=GEN)
    args.update(changes)
    with pytest.raises(error, match=message):
        model.chat(proc, args.pop("pixel_values"), args.pop("question"), args.pop("generation_config"), **args)


BATCH_CASES = {
    "questions a string": (dict(questions="What is it?"), TypeError,
                           r"questions must be a list of strings, one per image, got str"),
    "questions empty": (dict(questions=[], num_patches_list=[]), ValueError, r"questions is empty"),
    "a None question": (dict(questions=["What is it?", None]), TypeError,
                        r"questions\[1\] must be a string, got NoneType"),
    "num_patches_list short": (dict(num_patches_list=[2]), ValueError,
                               r"num_patches_list has 1 entries for 2 questions"),
    "num_patches_list sum": (dict(num_patches_list=[1, 2]), ValueError,
                             r"num_patches_list sums to 3 but pixel_values has 2 tiles"),
    "num_patches_list missing": (dict(num_patches_list=None), ValueError,
                                 r"pass num_patches_list: the number of tiles of each question's image"),
    "num_patches_list negative": (dict(pixel_values=tiles(2), num_patches_list=[3, -1]), ValueError,
                                  r"num_patches_list\[1\] must be a positive integer .*got -1"),
    "NaN pixels": (dict(pixel_values=with_value(tiles(2), float("nan"))), ValueError, r"pixel_values holds 1 NaN"),
    "3-D pixel_values": (dict(pixel_values=tiles(1)[0], num_patches_list=[1, 1]), ValueError,
                         r"pixel_values must have shape \(tiles, 3, 112, 112\)"),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batch_chat_refuses_bad_arguments_with_a_clear_error(setup, case):
    model, proc = setup
    changes, error, message = BATCH_CASES[case]
    args = dict(pixel_values=tiles(2), questions=["What is it?", "And this?"], generation_config=GEN,
                num_patches_list=[1, 1])
    args.update(changes)
    with pytest.raises(error, match=message):
        model.batch_chat(proc, args.pop("pixel_values"), args.pop("questions"), args.pop("generation_config"), **args)


def test_good_arguments_still_chat(setup):
    """The checks refuse only what is wrong: NumPy-free float tiles, ints of any integer type, several images."""
    model, proc = setup
    answer = model.chat(proc, tiles(3), "<image>\n<image>\nCompare them.", GEN, num_patches_list=[np.int64(1), 2])
    assert isinstance(answer, str)
    answers = model.batch_chat(proc, tiles(3), ["What is it?", "And this?"], GEN, num_patches_list=(2, 1))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert isinstance(model.chat(proc, None, "Hello", GEN), str)
    # The image processor's own `num_tiles` (a 1-D integer tensor) is a valid num_patches_list; a float one is not.
    assert model.batch_chat(proc, tiles(3), ["What is it?", "And this?"], GEN,
                            num_patches_list=torch.tensor([2, 1])) == answers
    with pytest.raises(TypeError, match=r"num_patches_list must be a list of tile counts, one per image, got Tensor"):
        model.batch_chat(proc, tiles(3), ["What is it?", "And this?"], GEN, num_patches_list=torch.tensor([2.0, 1.0]))


def test_a_multi_tile_chat_whose_history_holds_a_seg_continues(setup):
    """Seen with `mllmseg chat` on a 7-tile photo: the first answer held `[SEG]`, and the second turn stopped with
    "pass tile_grids" because generate()'s prefill decoded masks for the history's `[SEG]` (which generate() never
    returns). Now the turn runs, and a plain forward (no cache) still predicts the masks of its `[SEG]`."""
    model, proc = setup
    history = [("<image>\nDescribe the image.", "Sure, it is [SEG].")]
    answer, new_history = model.chat(proc, tiles(7), "Please segment the red circle.", GEN, history=history,
                                     return_history=True)
    assert isinstance(answer, str) and new_history[:1] == history
    # A plain forward (no cache) over the same kind of prompt still predicts the masks of its [SEG].
    seg = proc.tokenizer.convert_tokens_to_ids("[SEG]")
    batch = proc(images=[tiles(1)[0].permute(1, 2, 0).mul(40).add(120).clamp(0, 255).byte().numpy()],
                 text=["What is the red circle in this image?"], answers=["Sure, it is [SEG]."], tiling="single")
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    assert int((batch["input_ids"] == seg).sum()) == 1 and out.pred_masks[0].shape[0] == 1
