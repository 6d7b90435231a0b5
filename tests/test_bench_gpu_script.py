"""The GPU benchmark driver (benchmarks/bench_gpu.py, run by benchmarks/gpu.sh) in its CPU mode with tiny shapes,
and the FLOP counts its floors (and benchmarks/bench_real_size.py's) rest on.

No GPU is lent to the test machine: the driver runs `--tiny --device cpu` in a fresh process, the way gpu.sh runs it
on a GPU, and every section of its results file must hold numbers (or, for DeepSpeed and flash-attention, say why
not).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from _real import counted_flops, causal_gap, real_model, stage_flops, workload_from_batch  # noqa: E402
from bench_gpu import resolved_zero_config  # noqa: E402


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_has_numbers(results):
    assert results["environment"]["device"] == "cpu" and results["environment"]["tiny"] is True
    assert _number(results["matmul"]["measured_flops"]) and results["matmul"]["measured_flops"] > 0
    rows = results["segment"]
    assert {(r["tiles"], r["k"]) for r in rows} == {(1, 1), (1, 7), (7, 1), (7, 7)}
    for row in rows:
        for key in ("latency_ms", "gflop", "floor_ms", "ratio_to_floor", "peak_memory_mib", "tokens"):
            assert _number(row[key]), (key, row)
        assert row["latency_ms"] > 0 and row["gflop"] > 0
        # the floor is the FLOPs over the rate, and the ratio is latency over the floor
        assert row["floor_ms"] == pytest.approx(row["gflop"] * 1e9 / results["matmul"]["nominal_flops"] * 1e3)
        assert row["ratio_to_floor"] == pytest.approx(row["latency_ms"] / row["floor_ms"])
    (evaluation,) = results["evaluation"]
    assert _number(evaluation["images_per_s"]) and evaluation["images_per_s"] > 0
    (chat,) = results["chat"]
    assert chat["time_to_first_token_ms"] > 0 and chat["decode_tokens_per_s"] > 0
    steps = results["training"]["steps"]
    assert [s["gradient_checkpointing"] for s in steps] == [False, True]
    for step in steps:
        assert _number(step["step_s"]) and step["step_s"] > 0 and _number(step["peak_memory_mib"])
        assert step["loss_finite"] is True
    assert results["training"]["trainable_parameters"] > 0
    # DeepSpeed is not installed here (and needs CUDA): the section must say so rather than be silently empty.
    deepspeed = results["deepspeed"]
    assert "skipped" in deepspeed or _number(deepspeed.get("step_s"))
    assert _number(results["total_s"]) and "skipped_for_time" not in results


def test_more_work_counts_more_flops(results):
    by_case = {(r["tiles"], r["k"]): r for r in results["segment"]}
    assert by_case[(7, 1)]["gflop"] > by_case[(1, 1)]["gflop"]  # more tiles: more ViT and LLM tokens
    assert by_case[(1, 7)]["gflop"] > by_case[(1, 1)]["gflop"]  # more expressions: more tokens and mask heads
    assert by_case[(7, 1)]["tokens"] > by_case[(1, 1)]["tokens"]


@pytest.mark.parametrize("tiling,size,k", [("single", (160, 120), 2), ("dynamic", (336, 224), 3)])
def test_analytic_flops_match_torch_flop_counter(tiling, size, k):
    """The analytic per-stage counts equal what torch's FLOP counter sees while `segment` runs on a real (tiny)
    model; the LLM differs exactly by the upper triangle of the score matrices, which the counter counts as dense."""
    from _common import random_image

    model, processor, _ = real_model("tiny", dtype=torch.float32)
    image, exprs = random_image(*size), ["the red circle", "the blue square", "all shapes"][:k]
    question, answer = processor.segmentation_prompt(exprs)
    batch = processor(images=[image], text=[question], answers=[answer], tiling=tiling)
    work = workload_from_batch(model.config, batch)
    ours = stage_flops(model.config, work)
    counted = counted_flops(model, processor, image, exprs, tiling)
    for stage in ("vit", "projector", "lm_head", "decoder"):
        assert ours[stage] == pytest.approx(counted[stage], rel=1e-9), stage
    # transformers before 5.2x computes the rotary angles as a matmul (inv_freq [d/2, 1] @ positions [1, L]),
    # d * L FLOPs per sequence that later releases compute element-wise; either is exact.
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary = sum(head_dim * n for n in work.seq_lens)
    extra = counted["llm"] - (ours["llm"] + causal_gap(model.config, work))
    assert extra == pytest.approx(0, abs=1e-3) or extra == pytest.approx(rotary, rel=1e-9), (extra, rotary)
    assert work.tiles == int(batch["pixel_values"].shape[0]) and work.masks == k


def test_zero2_config_is_the_projects_with_auto_filled(tmp_path):
    config = resolved_zero_config(4)
    project = json.loads((ROOT / "mllmseg" / "recipes" / "zero2.json").read_text())
    assert config["zero_optimization"] == project["zero_optimization"]
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["train_micro_batch_size_per_gpu"] == 4 and "auto" not in json.dumps(config)
    odd = tmp_path / "zero.json"
    odd.write_text(json.dumps(dict(project, scheduler="auto")))
    with pytest.raises(ValueError, match="scheduler"):
        resolved_zero_config(4, odd)
