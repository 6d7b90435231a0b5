"""Benchmark 3: masks from generation, ours vs the pattern other packages use.

Both sides compute the image features once, generate the same answer and decode masks from the final hidden states
of the generation itself; neither runs a second forward. They differ in how they keep those states:

* ours (`segment(..., mode="generate")`): a forward hook on the language model keeps only its final (normed) states,
  `[B, L, T]` in all.
* `hf_states`: `generate(..., output_hidden_states=True, return_dict_in_generate=True)` (as LISA-style code and the
  transformers docs do it) keeps every layer's states of every step, `(layers + 1) x [B, L, T]`, and the masks read
  the last layer of each step.

So the difference is memory, not FLOPs: each side's peak memory is measured in a fresh subprocess (the rise of the
process's peak RSS, `VmHWM`, over its resident size before the call: tracemalloc does not see torch's allocations,
and torch's CPU allocator keeps no peak statistics), and the states each keeps are also counted analytically at the
real 1B / 8B shapes. (Until issue 21 this benchmark compared with a generate + teacher-forced re-forward that ran
the ViT three times; that 2.17x was against a baseline no one uses.)

A random model does not emit `[SEG]` by itself, so both sides get the same `LogitsProcessor` forcing the answer
(`"Sure,e1:[SEG], e2:[SEG], ..."` then `<|im_end|>`): the generated tokens are identical and the benchmark measures
the mask path, not the model's choices. Preprocessing and post-processing are outside both; prompts carry the
InternVL2.5 system message, as real checkpoints' do.

    .venv/bin/python benchmarks/bench_generate_masks.py [--quick] [--repeats 7] [--expressions 2]
"""
from __future__ import annotations

import argparse

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from _common import (child_json, describe, interleaved, machine, median, mid_model, peak_rss_rise_mib, random_image,
                     ratio_line, single_thread)

from mllmseg.remote_code.conversation_mllmseg import evaluation_prompt


class ForceAnswer(LogitsProcessor):
    """Forces `answer_ids` then EOS, whatever the model prefers (same tokens for every row)."""

    def __init__(self, answer_ids: list[int], eos_id: int):
        self.ids = list(answer_ids) + [eos_id]
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[step]] = 0.0
        return forced


def forced_config(processor, expressions, max_new_tokens: int = 64) -> dict:
    answer = evaluation_prompt(expressions)[1]
    ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return dict(logits_processor=LogitsProcessorList([ForceAnswer(ids, eos)]), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)


def prepare(model, processor, image, expressions):
    question = evaluation_prompt(expressions)[0]
    batch = processor(images=[image], text=[question], tiling="single")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"].to(model.dtype), "tile_grids": batch["tile_grids"]}


@torch.inference_mode()
def ours(model, processor, inputs, expressions):
    """What `segment(mode="generate")` runs: image features once, states recorded during generation."""
    image_outputs = model._image_outputs(inputs["pixel_values"])
    sequences, states = model._generate_with_states(inputs["input_ids"], inputs["attention_mask"], image_outputs,
                                                    forced_config(processor, expressions))
    masks = model._masks_from_states(sequences, states, image_outputs, inputs["tile_grids"])
    return sequences, masks


@torch.inference_mode()
def hf_states(model, processor, inputs, expressions):
    """Image features once, `generate(output_hidden_states=True, return_dict_in_generate=True)`, masks from the last
    layer of every step's states (no second forward)."""
    image_outputs = model._image_outputs(inputs["pixel_values"])
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         mm_encoder_outputs={"image": image_outputs}, output_hidden_states=True,
                         return_dict_in_generate=True, **forced_config(processor, expressions))
    states = torch.cat([step[-1] for step in out.hidden_states], dim=1)  # [B, L_total - 1, T], final layer
    masks = model._masks_from_states(out.sequences, states, image_outputs, inputs["tile_grids"])
    return out.sequences, masks


SIDES = {"ours_generate": ours, "hf_states": hf_states}


def memory_child(side: str, quick: bool, expressions: int) -> dict:
    """In a fresh process: the peak-RSS rise of one call of `side` (model and inputs built first)."""
    single_thread()
    model, processor = mid_model(quick=quick)
    exprs = EXPRESSIONS[:expressions]
    inputs = prepare(model, processor, random_image(), exprs)
    rise, _ = peak_rss_rise_mib(lambda: SIDES[side](model, processor, inputs, exprs))
    return {"peak_rise_mib": rise}


def kept_states_mib(layers: int, width: int, tokens: int, batch: int, bytes_per: int = 2) -> tuple[float, float]:
    """MiB of final states ours keeps vs all layers' states `output_hidden_states` keeps, for `batch` sequences of
    `tokens` tokens."""
    ours_bytes = batch * tokens * width * bytes_per
    return ours_bytes / 2**20, ours_bytes * (layers + 1) / 2**20


EXPRESSIONS = ["the red circle", "the big blue square", "the small green triangle", "all shapes", "the yellow star"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--expressions", type=int, default=2)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    single_thread()
    model, processor = mid_model(quick=args.quick)
    print(f"# 3. Masks from generation: segment(mode='generate') vs generate(output_hidden_states=True)\n{machine()}")
    print(describe(model))
    expressions = EXPRESSIONS[: args.expressions]
    inputs = prepare(model, processor, random_image(), expressions)
    seq_a, masks_a = ours(model, processor, inputs, expressions)
    seq_b, masks_b = hf_states(model, processor, inputs, expressions)
    assert torch.equal(seq_a, seq_b), "the forced answers differ"
    n_seg = int((seq_a == model.config.seg_token_id).sum())
    diff = max(float((a - b).abs().max()) for a, b in zip(masks_a, masks_b))
    scale = max(float(a.abs().max()) for a in masks_a)
    prompt, new_tokens = inputs["input_ids"].shape[1], seq_a.shape[1] - inputs["input_ids"].shape[1]
    print(f"prompt {prompt} tokens (with the system message), {new_tokens} generated (forced), {n_seg} [SEG] -> "
          f"{n_seg} masks; max |mask logit difference| {diff:.2e} (logits up to {scale:.1f}); same tokens: "
          f"{torch.equal(seq_a, seq_b)}")
    times = interleaved({"hf_states": lambda: hf_states(model, processor, inputs, expressions),
                         "ours_generate": lambda: ours(model, processor, inputs, expressions)}, repeats)
    print(ratio_line(times, "hf_states", "ours_generate"))
    ratio = median(times["hf_states"]) / median(times["ours_generate"])
    memory = {side: [child_json("bench_generate_masks", "memory_child", side, args.quick, args.expressions)["peak_rise_mib"]
                     for _ in range(2)] for side in SIDES}
    mem = {side: min(v) for side, v in memory.items()}
    print(f"peak memory rise of one call (fresh subprocess each, VmHWM - VmRSS, min of 2): ours "
          f"{mem['ours_generate']:.1f} MiB, hf_states {mem['hf_states']:.1f} MiB "
          f"({mem['hf_states'] / max(mem['ours_generate'], 1e-6):.2f}x)")
    c = model.config.text_config
    kept = kept_states_mib(c.num_hidden_layers, c.hidden_size, prompt + new_tokens, 1, bytes_per=4)
    print(f"states kept, this model (fp32, 1 sequence): ours {kept[0]:.1f} MiB, output_hidden_states {kept[1]:.1f} MiB")
    for name, layers, width in (("1B (Qwen2.5-0.5B)", 24, 896), ("8B (InternLM2.5-7B)", 32, 4096)):
        ours_mib, all_mib = kept_states_mib(layers, width, 600, 8)
        print(f"states kept at {name}, bf16, batch 8 x 600 tokens: ours {ours_mib:.0f} MiB, output_hidden_states "
              f"{all_mib:.0f} MiB")
    print(f"RESULT generate_masks time_ratio={ratio:.2f} (hf_states / ours) memory_ratio="
          f"{mem['hf_states'] / max(mem['ours_generate'], 1e-6):.2f} max_abs_diff={diff:.2e}")
    return ratio


if __name__ == "__main__":
    main()
