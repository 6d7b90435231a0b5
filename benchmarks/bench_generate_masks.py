"""Benchmark 3: masks from generation without a second prefill.

`segment(..., mode="generate")` keeps the LLM's final hidden states while generating (a forward hook) and computes
the image features once, so the masks of the generated `[SEG]` tokens need no further forward. The alternative,
written here as LISA-style code, generates, then runs a teacher-forced forward over prompt + generated tokens with
`output_hidden_states=True` (the ViT and the whole prefill a second time), takes the states before each `[SEG]`
and runs the decoder.

A random model almost never generates `[SEG]`, so both sides get the same `LogitsProcessor` that forces a fixed
answer (the evaluation answer `"Sure,e1:[SEG], e2:[SEG], ..."` then `<|im_end|>`): the generated tokens are
identical and the benchmark measures the mask path, not the model's choices. Both sides start from the same
processed inputs (preprocessing and post-processing are excluded from both) and the mask logits are compared.

    .venv/bin/python benchmarks/bench_generate_masks.py [--quick] [--repeats 7] [--expressions 3]
"""
from __future__ import annotations

import argparse

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from _common import describe, interleaved, machine, median, mid_model, random_image, ratio_line, single_thread

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
def lisa_style(model, processor, inputs, expressions):
    """Generate, then a second full teacher-forced forward over prompt + answer for the [SEG] states."""
    sequences = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], **forced_config(processor, expressions))
    attention = torch.ones_like(sequences)
    out = model.model(input_ids=sequences, attention_mask=attention, pixel_values=inputs["pixel_values"],
                      output_hidden_states=True)
    hidden = out.hidden_states[-1]  # final (normed) states of every position
    seg_mask = sequences == model.config.seg_token_id
    seg_batch, seg_pos = seg_mask.nonzero(as_tuple=True)
    seg_embeddings = hidden[seg_batch, seg_pos - 1]  # the state before each [SEG]
    vit = model.get_image_features(inputs["pixel_values"], return_dict=True).last_hidden_state  # LISA re-encodes too
    grid = model.config.vision_grid
    image_pos = (sequences == model.config.image_token_id).nonzero(as_tuple=True)
    llm_image = hidden[image_pos[0], image_pos[1] - 1].view(-1, model.config.tokens_per_tile, hidden.shape[-1])
    masks = []
    for b in range(sequences.shape[0]):  # per sample, per [SEG]: the decoder as a plain module call
        rows = seg_embeddings[seg_batch == b]
        n = rows.shape[0]
        masks.append(model.mask_decoder(vit[b : b + 1, -grid * grid :].expand(n, -1, -1),
                                        llm_image[b : b + 1].expand(n, -1, -1), rows))
    return sequences, masks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--expressions", type=int, default=2)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    single_thread()
    model, processor = mid_model(quick=args.quick)
    print(f"# 3. Masks from generation: segment(mode='generate') vs generate + teacher-forced re-forward\n{machine()}")
    print(describe(model))
    expressions = ["the red circle", "the big blue square", "the small green triangle", "all shapes",
                   "the yellow star"][: args.expressions]
    inputs = prepare(model, processor, random_image(), expressions)
    seq_a, masks_a = ours(model, processor, inputs, expressions)
    seq_b, masks_b = lisa_style(model, processor, inputs, expressions)
    assert torch.equal(seq_a, seq_b), "the forced answers differ"
    n_seg = int((seq_a == model.config.seg_token_id).sum())
    diff = max(float((a - b).abs().max()) for a, b in zip(masks_a, masks_b))
    scale = max(float(a.abs().max()) for a in masks_a)
    new_tokens = seq_a.shape[1] - inputs["input_ids"].shape[1]
    print(f"prompt {inputs['input_ids'].shape[1]} tokens, {new_tokens} generated (forced), {n_seg} [SEG] -> "
          f"{n_seg} masks; max |mask logit difference| {diff:.2e} (logits up to {scale:.1f}); "
          f"same tokens: {torch.equal(seq_a, seq_b)}")
    times = interleaved({"lisa_style": lambda: lisa_style(model, processor, inputs, expressions),
                         "ours_generate": lambda: ours(model, processor, inputs, expressions)}, repeats)
    print(ratio_line(times, "lisa_style", "ours_generate"))
    ratio = median(times["lisa_style"]) / median(times["ours_generate"])
    print(f"RESULT generate_masks ratio={ratio:.2f} target>=1.5 max_abs_diff={diff:.2e}")
    return ratio


if __name__ == "__main__":
    main()
