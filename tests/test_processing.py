import subprocess
import sys
import textwrap

import pytest
import torch

from mllmseg import MLLMSegProcessor
from mllmseg.remote_code.conversation_mllmseg import (
    INTERNVL_SYSTEM_MESSAGE,
    evaluation_prompt,
    render_conversation,
    training_prompt,
)
from mllmseg.tiny import build_processor, build_tiny_model

from PIL import Image


@pytest.fixture(scope="module")
def tiny_setup():
    model, tok = build_tiny_model()
    return model, tok, build_processor(tok, model.config)


def test_chat_format_is_internvl25():
    text = render_conversation([("<image>\nhi", "hello"), ("more?", None)], "SYS")
    assert text == (
        "<|im_start|>system\nSYS<|im_end|>\n"
        "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nmore?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_conversation([("q", None)], INTERNVL_SYSTEM_MESSAGE, bos="<s>").startswith("<s><|im_start|>system\n你是书生·万象")


def test_prompts_follow_the_reference():
    q, a = evaluation_prompt(["the man. ", " a dog"])
    assert q == "<image>\n What are the man, a dogin this image? Please output segmentation masks."  # sic
    assert a == "Sure,the man:[SEG], a dog:[SEG]."
    import random

    questions, answers = set(), set()
    for seed in range(60):
        q, a = training_prompt(["The Red circle.", "a dog"], [False, True], random.Random(seed))
        questions.add(q.split("\n", 1)[1].replace("the red circle, a dog", "{}"))
        answers.add(a)
        assert q.startswith("<image>\n") and "the red circle, a dog" in q  # lower-cased, dots stripped
        assert a.count("[SEG]") == 1 and a.count("[REJ]") == 1 and a.index("[SEG]") < a.index("[REJ]")
    assert len(questions) == 4 and len(answers) == 5  # every template is used
    assert "Sure, they are The Red circle:[SEG], a dog:[REJ]." in answers


def test_processor_expands_images_and_labels_only_the_answer(tiny_setup):
    model, tok, proc = tiny_setup
    images = [Image.new("RGB", (30, 30), "red"), Image.new("RGB", (300, 60), "blue")]
    batch = proc(images=images, text=["What is x?", "<image>\nWhat is y?"], answers=["Sure, [SEG].", "No, [REJ]."],
                 tiling="dynamic")
    assert batch["num_tiles"].tolist() == [1, int(batch["num_tiles"][1])] and int(batch["num_tiles"][1]) > 1
    assert batch["original_sizes"].tolist() == [[30, 30], [60, 300]]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    per_tile = model.config.tokens_per_tile
    assert ((batch["input_ids"] == ctx).sum(1) // per_tile).tolist() == batch["num_tiles"].tolist()
    for i, answer in enumerate(["Sure, [SEG].", "No, [REJ]."]):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == answer + "<|im_end|>\n"  # as InternVL2.5 preprocessing labels it
        text = tok.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])
        assert text.startswith("<|im_start|>system\n你是书生") and "<img><IMG_CONTEXT>" in text


def test_processor_errors(tiny_setup):
    _, tok, proc = tiny_setup
    with pytest.raises(ValueError, match="got 2 images for 1 texts"):
        proc(images=[Image.new("RGB", (8, 8))] * 2, text=["a"])
    with pytest.raises(ValueError, match="over the limit of 50"):
        proc(images=[Image.new("RGB", (8, 8))], text=["a"], max_length=50)
    with pytest.raises(ValueError, match="lacks MLLMSeg's tokens"):
        from mllmseg.tiny import build_tiny_tokenizer

        MLLMSegProcessor(proc.image_processor, build_tiny_tokenizer(with_seg_tokens=False))


def test_processor_refuses_bad_text_arguments_naming_them(tiny_setup):
    """None, bytes or numbers as questions / answers / history turns / expressions used to surface as
    "'NoneType' object has no attribute 'replace'" or an unpack error; each now names the argument, index and
    value."""
    _, tok, proc = tiny_setup
    cases = [
        (dict(text=[None]), TypeError, r"text\[0\] must be a string, got NoneType \(None\)"),
        (dict(text=b"hello"), TypeError, r"text must be a string or a list of strings, got bytes \(b'hello'\)"),
        (dict(text=["a", 5]), TypeError, r"text\[1\] must be a string, got int \(5\)"),
        (dict(text=5), TypeError, r"text must be a string or a list of strings, got int \(5\)"),
        (dict(text=["a"], answers=[None]), TypeError, r"answers\[0\] must be a string, got NoneType"),
        (dict(text=["a"], answers=b"x"), TypeError, r"answers must be a string or a list of strings, got bytes"),
        (dict(text=["a"], history=[[("q",)]]), TypeError, r"history\[0\]\[0\] must be a \(question, answer\) "
                                                           r"pair of strings, got \('q',\)"),
        (dict(text=["a"], history=[[(None, "x")]]), TypeError, r"history\[0\]\[0\] must be a \(question, answer\)"),
        (dict(text=["a"], history=["q"]), TypeError, r"history\[0\] must be a list of \(question, answer\) pairs"),
        (dict(text=["a"], num_tiles=[[0]]), ValueError, r"num_tiles\[0\] must be a list of positive integers, got "
                                                       r"\[0\]"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            proc(**kwargs)
    for expressions, error, match in [
        ([None], TypeError, r"expressions\[0\] must be a string, got NoneType \(None\)"),
        (b"the dog", TypeError, r"expressions must be a list of strings, got bytes \(b'the dog'\)"),
        ("the dog", TypeError, r"expressions must be a list of strings, got str"),
        (["the dog", " . "], ValueError, r"expressions\[1\] is empty \(' \. '\)"),
    ]:
        with pytest.raises(error, match=match):
            proc.segmentation_prompt(expressions)


@pytest.mark.parametrize("size", [(0, 0), (0, 9)])
def test_segment_refuses_an_empty_image(tiny_setup, size):
    model, _, proc = tiny_setup
    from mllmseg.remote_code.image_processing_mllmseg import ImageLoadError

    with pytest.raises(ImageLoadError, match=f"Image is empty: {size[0]}x{size[1]} pixels"):
        model.segment(proc, Image.new("RGB", size), ["the dog"])


def test_post_processing_masks_boxes_rle():
    logits = torch.full((2, 8, 8), -10.0)
    logits[0, 2:4, 4:8] = 10.0  # rows 2-3, cols 4-7 of the canvas
    probs, masks = MLLMSegProcessor.post_process_masks(logits, (16, 8))  # 2x taller image
    assert masks.shape == (2, 16, 8) and not masks[1].any()
    rows = masks[0].any(1).nonzero().flatten()
    cols = masks[0].any(0).nonzero().flatten()
    assert 4 <= int(rows.min()) <= 5 and 6 <= int(rows.max()) <= 7 and int(cols.min()) == 4 and int(cols.max()) == 7
    boxes = MLLMSegProcessor.masks_to_boxes(masks)
    assert boxes[0].tolist() == [4.0, float(rows.min()), 7.0, float(rows.max())]
    assert boxes[1].isnan().all()  # an empty mask has no box ([0, 0, 0, 0] is pixel (0, 0)'s)
    from pycocotools import mask as mask_utils

    rle = MLLMSegProcessor.masks_to_rle(masks)
    assert isinstance(rle[0]["counts"], str)
    decoded = mask_utils.decode({"size": rle[0]["size"], "counts": rle[0]["counts"].encode()})
    assert (decoded.astype(bool) == masks[0].numpy()).all()


def test_auto_processor_from_remote_code_in_a_fresh_process(tiny_setup, tmp_path):
    model, tok, proc = tiny_setup
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        sys.modules["mllmseg"] = None
        from PIL import Image
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
        assert type(proc).__name__ == "MLLMSegProcessor", type(proc)
        assert type(proc.image_processor).__name__ == "MLLMSegImageProcessor"
        assert type(proc).__module__.startswith("transformers_modules."), type(proc).__module__
        batch = proc(images=[Image.new("RGB", (50, 20), "red")], text=["q"], answers=["Sure, [SEG]."])
        print(proc.tokens_per_tile, batch["input_ids"].tolist(), batch["pixel_values"].sum().item())
        """
    )
    (tmp_path / "p.py").write_text(script)
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "p.py"), str(tmp_path)], capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "h")})
    assert result.returncode == 0, result.stderr[-3000:]
    expected = proc(images=[Image.new("RGB", (50, 20), "red")], text=["q"], answers=["Sure, [SEG]."])
    line = result.stdout.strip().splitlines()[-1]
    assert line == f"{proc.tokens_per_tile} {expected['input_ids'].tolist()} {expected['pixel_values'].sum().item()}"


def test_processor_follows_transformers_keyword_conventions(tiny_setup):
    """Keywords are routed (image-processor ones to the image processor, `images_kwargs` / `text_kwargs`), tensors
    come as asked, nothing is dropped silently, and the output feeds `model(**...)` and `generate(**...)`."""
    import numpy as np
    from PIL import Image

    model, tok, proc = tiny_setup
    image = Image.new("RGB", (300, 100), "red")
    plain = proc(images=image, text="hi", tiling="dynamic")
    routed = proc(images=image, text="hi", tiling="dynamic", use_thumbnail=False, images_kwargs={"max_tiles": 2})
    assert int(plain["num_tiles"][0]) == 4 and int(routed["num_tiles"][0]) == 2  # 3x1 + thumbnail, then 2x1 only
    as_np = proc(images=image, text="hi", return_tensors="np")
    assert isinstance(as_np["input_ids"], np.ndarray) and isinstance(as_np["pixel_values"], np.ndarray)
    left = proc(text=["a", "a longer one"], text_kwargs={"padding_side": "left"})
    assert left["attention_mask"][0, 0] == 0
    for bad, error, match in [
        (dict(truncation=True), ValueError, "truncation is not supported"),
        (dict(shuffle=True), TypeError, r"unknown keyword\(s\) \['shuffle'\]"),
        (dict(text_kwargs={"stride": 2}), TypeError, "unknown text keyword 'stride'"),
        (dict(padding="max_length"), ValueError, "padding must be"),
        (dict(return_tensors="tf"), ValueError, "return_tensors must be"),
    ]:
        with pytest.raises(error, match=match):
            proc(text="hi", **bad)
    with pytest.raises(ValueError, match="pass text .* and/or images; got neither"):
        proc()
    assert {"num_tiles", "tile_grids", "original_sizes", "pixel_values"} <= set(proc.model_input_names)
    batch = proc(images=image, text="Sure.", tiling="single")
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=2, pad_token_id=tok.pad_token_id)


def test_segmentation_results_are_dict_like_and_convert_to_json(tiny_setup):
    """Like transformers' outputs: keys, item access, tuples; `to_records` gives JSON-ready dicts per expression whose
    box is None for an empty mask (a one-pixel mask at (0, 0) has box [0, 0, 0, 0])."""
    import json

    from mllmseg.remote_code.processing_mllmseg import SegmentationResult

    model, _, proc = tiny_setup
    result = model.segment(proc, Image.new("RGB", (40, 30), "white"), ["the dog", "the cat"])
    assert list(result.keys())[:6] == ["expressions", "masks", "boxes", "scores", "seg_probs", "rejected"]
    assert result["masks"] is result.masks and result.to_tuple()[0] == ["the dog", "the cat"]
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[1, 0, 0] = True  # one pixel at (0, 0)
    masks[2, 1:3, 2:5] = True
    made = SegmentationResult(expressions=["empty", "dot", "bar"], masks=masks,
                              boxes=MLLMSegProcessor.masks_to_boxes(masks), scores=torch.tensor([0.0, 0.9, 0.8]),
                              seg_probs=torch.tensor([0.2, 0.9, 0.7]), rejected=torch.tensor([True, False, False]),
                              text="x")
    records = made.to_records(include_masks=True)
    assert [r["box"] for r in records] == [None, [0, 0, 0, 0], [2, 1, 4, 2]]
    assert [r["area"] for r in records] == [0, 1, 6] and [r["rejected"] for r in records] == [True, False, False]
    assert records[2]["mask"][1] == [False, False, True, True, True]
    assert json.loads(json.dumps(records)) == records  # plain Python values only
    assert "rle" not in records[0] and "mask" not in made.to_records()[0]
