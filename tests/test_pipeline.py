"""`transformers.pipeline("image-segmentation", model=checkpoint, trust_remote_code=True)`: the custom pipeline a
saved checkpoint registers, loaded in a fresh `python -I` process in which the mllmseg package cannot be imported,
gives the masks, boxes and decisions of `model.segment` as plain, JSON-serialisable dicts."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mllmseg.hub.release import remote_code_closure
from mllmseg.tiny import build_processor, build_tiny_model

_SCRIPT = r"""
import json, sys
sys.modules["mllmseg"] = None
import numpy as np
from PIL import Image
from transformers import pipeline
folder, image_path = sys.argv[1], sys.argv[2]
seg = pipeline("image-segmentation", model=folder, trust_remote_code=True)
by_default = type(pipeline(model=folder, trust_remote_code=True)).__name__  # the one task a checkpoint registers
out = seg(image_path, expressions=["the red circle", "a blue square"], threshold=0.5)
listed = seg([{"image": image_path, "expressions": "left"}, image_path], expressions="right")
items = [dict(item, mask=np.asarray(item["mask"]).tolist()) for item in out]
print("RESULT " + json.dumps({"items": items, "listed": [[i["label"] for i in r] for r in listed],
                              "cls": type(seg).__name__, "default": by_default,
                              "mask_mode": out[0]["mask"].mode}))
"""


def _run_fresh(script: str, folder, image_path, tmp_path) -> dict:
    """Run `script` in a fresh `python -I` (offline, its own HF_HOME) and return the JSON it prints after RESULT."""
    proc = subprocess.run([sys.executable, "-I", "-c", script, str(folder), str(image_path)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                     "HF_HOME": str(tmp_path / "hf")})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "ckpt"
    model, tokenizer = build_tiny_model(seed=2)
    processor = build_processor(tokenizer, model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


def test_pipeline_from_a_saved_checkpoint_matches_segment(saved, tmp_path):
    folder, model, processor = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["image-segmentation"]["impl"] == "pipeline_mllmseg.MLLMSegSegmentationPipeline"
    assert "pipeline_mllmseg.py" in remote_code_closure(folder)  # a release carries it
    rng = np.random.default_rng(0)
    image_path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (70, 110, 3), dtype=np.uint8)).save(image_path)
    got = _run_fresh(_SCRIPT, folder, image_path, tmp_path)
    assert got["cls"] == got["default"] == "MLLMSegSegmentationPipeline" and got["mask_mode"] == "L"
    assert got["listed"] == [["left"], ["right"]]  # a dict's own expressions win over the shared ones
    with torch.no_grad():
        expected = model.segment(processor, Image.open(image_path), ["the red circle", "a blue square"])
    assert [item["label"] for item in got["items"]] == expected.expressions
    for i, item in enumerate(got["items"]):
        mask = np.asarray(item["mask"], dtype=np.uint8)
        assert mask.shape == (70, 110) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, expected.masks[i].numpy())
        assert item["rejected"] == bool(expected.rejected[i])
        assert item["score"] == pytest.approx(float(expected.scores[i]), abs=1e-6)
        if expected.masks[i].any():
            assert item["box"] == [int(v) for v in expected.boxes[i].tolist()]
        else:
            assert item["box"] is None  # not [0, 0, 0, 0], which is a one-pixel mask's box


def test_pipeline_refuses_missing_expressions_and_unknown_arguments(saved):
    from transformers import pipeline

    folder, model, processor = saved
    seg = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    image = Image.new("RGB", (40, 30))
    with pytest.raises(ValueError, match="pass expressions="):
        seg(image)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['treshold'\]"):
        seg(image, expressions="x", treshold=0.3)


_CHAT_SCRIPT = r"""
import json, sys
sys.modules["mllmseg"] = None
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
folder, image_path = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.open(image_path)
messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}]
settings = dict(max_new_tokens=6, do_sample=False)
chat = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
piped = chat(text=messages, return_tensors=True, **settings)[0]["generated_token_ids"]
answer = chat(text=messages, **settings)[0]["generated_text"][-1]
pixel_values = processor.image_processor(image)["pixel_values"]
with torch.no_grad():
    by_chat = model.chat(processor, pixel_values, "Describe it.", dict(settings))  # the AutoProcessor itself
    by_tokenizer = model.chat(processor.tokenizer, pixel_values, "Describe it.", dict(settings))
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    direct = processor(images=image, text="Describe it.", padding_side="left")
    generated = model.generate(**inputs, **settings)
prompt_len = inputs["input_ids"].shape[1]
print("RESULT " + json.dumps({
    "answer_role": answer["role"], "by_chat": by_chat, "by_tokenizer": by_tokenizer,
    "piped": [int(t) for t in piped[prompt_len:]], "generated_ids": generated[0, prompt_len:].tolist(),
    "decoded": processor.decode_answer(processor.trim_answer(generated[0, prompt_len:].tolist())),
    "same_ids": inputs["input_ids"].tolist() == direct["input_ids"].tolist(),
    "same_pixels": bool(torch.equal(inputs["pixel_values"], direct["pixel_values"])),
    "text": processor.apply_chat_template(messages, tokenize=False),
}))
"""


def test_chat_template_and_image_text_to_text_pipeline_equal_chat(saved, tmp_path):
    """`processor.apply_chat_template` renders transformers-style messages in the InternVL2.5 format (the same ids and
    tiles as `processor(images, text)`), `pipeline("image-text-to-text")` runs on it and answers what `model.chat`
    answers, and `chat` takes the processor `AutoProcessor` loads (a copy of the class from another module)."""
    folder, model, processor = saved
    image_path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(image_path)
    got = _run_fresh(_CHAT_SCRIPT, folder, image_path, tmp_path)
    assert got["same_ids"] and got["same_pixels"]
    assert got["by_chat"] == got["by_tokenizer"] and got["by_chat"]
    assert got["piped"] == got["generated_ids"] and got["answer_role"] == "assistant"  # the pipeline's tokens
    assert got["by_chat"] == got["decoded"]  # chat's answer: the same generation, trimmed at the end of the turn
    assert got["text"] == processor.render("<image>\nDescribe it.")  # the InternVL2.5 conversation, left open


def test_apply_chat_template_refuses_what_it_cannot_render(saved):
    _, _, processor = saved
    image = Image.new("RGB", (20, 20))
    two = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image},
                                        {"type": "text", "text": "Compare."}]}]
    with pytest.raises(ValueError, match="has 2 images; this processor takes one image per conversation"):
        processor.apply_chat_template(two, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match=r"conversation\[0\]: content\[0\] has type 'video'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}])
    with pytest.raises(ValueError, match="ends with an assistant message"):
        processor.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "[SEG] is text here"}]
    assert processor.apply_chat_template(history) == processor.render("[SEG] is text here", None, [("Hi", "Hello")],
                                                                      "Be brief.")
    ids = processor.apply_chat_template(history, tokenize=True)
    assert processor.seg_token_id not in ids  # user text is escaped, as in __call__
