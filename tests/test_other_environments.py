"""Checkpoints across transformers releases, in real environments (CI builds them with .ci/overlay_env.py):

* `MLLMSEG_OTHER_PYTHON`: the python of another supported environment (CI: the oldest one, transformers 5.18).
  A checkpoint saved in either environment loads in a fresh `python -I` process of the other and gives identical
  logits, masks, `segment` results and chat answers.
* `MLLMSEG_UNSUPPORTED_PYTHON`: a python whose transformers is outside the supported range (CI: 5.17). Loading a
  checkpoint's remote code there fails with one error naming the installed release and the range, and
  `mllmseg env` says so.

Without these variables the tests skip, except under `MLLMSEG_REQUIRE_OTHER_ENVS=1` (CI), where they fail.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mllmseg.remote_code.compat_mllmseg import SUPPORTED_TRANSFORMERS

# Build and save a tiny remote-code checkpoint with a processor (runs with the mllmseg package importable).
SAVE = textwrap.dedent(
    """
    import sys, transformers
    from mllmseg.tiny import build_processor, build_tiny_model
    model, tok = build_tiny_model(seed=int(sys.argv[2]))
    processor = build_processor(tok, model.config, system_message="You are a test.")
    model.save_pretrained(sys.argv[1])
    processor.save_pretrained(sys.argv[1])
    print(transformers.__version__)
    """
)

# Load it where mllmseg cannot be imported: only the checkpoint's remote code builds model and processor.
LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["mllmseg"] = None
    import numpy as np, torch, transformers
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    folder, out_path = sys.argv[1:3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 150, 3), dtype=np.uint8))
    batch = processor(images=[image], text=["Please segment the circle."], answers=["Sure, [SEG]."])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], tile_grids=batch["tile_grids"])
    results = model.segment(processor, [image], [["the circle", "the red square"]])
    answer = model.chat(processor.tokenizer, batch["pixel_values"], "Describe the image.",
                        dict(max_new_tokens=8, do_sample=False))
    torch.save({"transformers": transformers.__version__, "logits": out.logits, "pred_masks": out.pred_masks,
                "masks": [r.masks for r in results], "probabilities": [r.probabilities for r in results],
                "rejected": [r.rejected for r in results], "answer": answer}, out_path)
    """
)


def _python(variable: str) -> str:
    path = os.environ.get(variable)
    if not path:
        message = f"{variable} is not set (CI sets it: see .ci/run)"
        if os.environ.get("MLLMSEG_REQUIRE_OTHER_ENVS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _run(python: str, script: str, *args, tmp_path, isolated=False, check=True):
    path = tmp_path / ("save.py" if script is SAVE else "load.py" if script is LOAD else "snippet.py")
    path.write_text(script)
    command = [python, *(["-I"] if isolated else []), str(path), *map(str, args)]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("saved_by", ["this", "other"])
def test_checkpoint_gives_identical_outputs_in_another_supported_environment(tmp_path, saved_by):
    other = _python("MLLMSEG_OTHER_PYTHON")
    pythons = {"this": sys.executable, "other": other}
    folder = tmp_path / "ckpt"
    _run(pythons[saved_by], SAVE, folder, 3, tmp_path=tmp_path)
    outs = {}
    for where, python in pythons.items():
        _run(python, LOAD, folder, tmp_path / f"{where}.pt", tmp_path=tmp_path, isolated=True)
        outs[where] = torch.load(tmp_path / f"{where}.pt")
    this, there = outs["this"], outs["other"]
    assert this["transformers"] != there["transformers"], "the two environments have the same transformers"
    torch.testing.assert_close(there["logits"], this["logits"], atol=0, rtol=0)
    for key in ("pred_masks", "masks", "probabilities", "rejected"):
        assert len(there[key]) == len(this[key])
        for a, b in zip(there[key], this[key]):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=key)
    assert this["masks"][0].shape == (2, 90, 150)
    assert there["answer"] == this["answer"]


def test_unsupported_transformers_is_refused_with_one_clear_error(tmp_path):
    unsupported = _python("MLLMSEG_UNSUPPORTED_PYTHON")
    folder = tmp_path / "ckpt"
    _run(sys.executable, SAVE, folder, 3, tmp_path=tmp_path)
    version = _run(unsupported, "import transformers; print(transformers.__version__)", tmp_path=tmp_path).stdout.strip()
    result = _run(unsupported, LOAD, folder, tmp_path / "out.pt", tmp_path=tmp_path, isolated=True, check=False)
    assert result.returncode != 0 and not (tmp_path / "out.pt").exists()
    last = result.stderr.strip().splitlines()[-1]
    assert "UnsupportedTransformersError" in last
    assert f"transformers {version} is installed" in last and SUPPORTED_TRANSFORMERS in last

    env = subprocess.run([unsupported, "-m", "mllmseg", "env", "--json"], capture_output=True, text=True,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert env.returncode == 0, env.stderr[-2000:]
    report = json.loads(env.stdout)
    packages = {p["name"]: p for p in report["packages"]}
    assert packages["transformers"]["installed"] == version and packages["transformers"]["in_range"] is False
    assert report["remote_code"]["supported"] is False and version in report["remote_code"]["error"]

    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "x.png")
    other = subprocess.run([unsupported, "-m", "mllmseg", "segment", str(folder), "x.png", "the circle"],
                           capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr[-2000:]
    assert SUPPORTED_TRANSFORMERS in other.stderr
