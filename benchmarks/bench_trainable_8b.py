"""Benchmark 4: the trainable set at InternVL2.5-8B dimensions, ours vs the reference recipe (no weights needed).

Both models are built on the meta device (shapes only, no memory) with the 8B dimensions: InternViT-300M (24 layers,
width 1024, 448 px, patch 14), an LLM of width 4096, 32 layers, 32 heads / 8 KV heads, FFN 14336, vocabulary
92,553 + [SEG] + [REJ] (InternLM2.5-7B's shapes on a transformers "llama" config: InternLM2's fused `wqkv` holds the
same weights as separate q/k/v projections; LoRA on the fused layer has one A matrix where split q/k/v have three,
i.e. 2 * r * 4096 fewer parameters per layer, accounted for below).

* ours: `mllmseg/recipes/res_8b.yaml`'s `lora:` section through `training.recipes.load_recipe` and
  `training.lora.apply_lora` (LoRA r 64 on every LLM linear layer, decoder + final norm in full, only the `[SEG]` /
  `[REJ]` rows of the input and output embeddings), counted with `trainable_parameter_counts`.
* reference: the reference code's set (SPEC section 4): the same LoRA, decoder and final norm, plus the *full* input
  and output embeddings (~943.6M, InternLM2's fused wqkv). Counted two ways that must agree: the closed formula used
  by tests/test_training_lora.py, and our `apply_lora` with `embeddings: full` on the same meta model minus the
  2 * r * 4096 * 32 extra LoRA-A parameters that split q/k/v carry over InternLM2's fused wqkv.

Optimizer memory assumption (stated, not measured): bf16 weights with mixed-precision AdamW as DeepSpeed ZeRO /
the HF Trainer keep it: per trainable parameter an fp32 master copy (4 B) + two fp32 moments (4 B + 4 B) = 12 B of
optimizer state, plus a bf16 gradient (2 B). Frozen parameters need neither. Totals are before ZeRO sharding.

    .venv/bin/python benchmarks/bench_trainable_8b.py
"""
from __future__ import annotations

import argparse

import torch
from transformers import InternVLVisionConfig

from _common import machine

from mllmseg.remote_code.configuration_mllmseg import MLLMSegConfig
from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
from mllmseg.training.lora import LoraRecipe, apply_lora, trainable_parameter_counts
from mllmseg.training.recipes import load_recipe

VOCAB = 92553 + 2
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 4096, 32, 32, 8, 14336
STATE_BYTES = 4 + 4 + 4  # fp32 master + exp_avg + exp_avg_sq
GRAD_BYTES = 2  # bf16 gradient


def config_8b() -> MLLMSegConfig:
    vision = InternVLVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  intermediate_size=4096, image_size=448, patch_size=14)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=FFN,
                tie_word_embeddings=False)
    return MLLMSegConfig(vision_config=vision, text_config=text, image_token_id=92546, image_start_token_id=92544,
                         image_end_token_id=92545, seg_token_id=VOCAB - 2, rej_token_id=VOCAB - 1,
                         tie_word_embeddings=False)


def meta_model():
    with torch.device("meta"):
        return MLLMSegForConditionalGeneration(config_8b())


def reference_formula(decoder: int, r: int = 64) -> int:
    """The reference recipe's trainable count (InternLM2: LoRA on wqkv, wo, w1, w2, w3; full embeddings)."""
    kv = HIDDEN // HEADS * KV_HEADS
    lora_per_layer = r * ((HIDDEN + HIDDEN + 2 * kv) + (HIDDEN + HIDDEN) + 3 * (HIDDEN + FFN))
    return LAYERS * lora_per_layer + 2 * VOCAB * HIDDEN + decoder + HIDDEN


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="(no effect: this benchmark takes seconds)")
    parser.add_argument("--recipe", default="res_8b")
    args = parser.parse_args(argv)
    print(f"# 4. Trainable set at 8B dimensions (meta device)\n{machine()}")
    recipe = load_recipe(args.recipe)
    lora = dict(recipe["lora"])
    model = meta_model()
    decoder = sum(p.numel() for p in model.mask_decoder.parameters())
    ours = trainable_parameter_counts(apply_lora(model, LoraRecipe(**lora)))
    full = trainable_parameter_counts(apply_lora(meta_model(), LoraRecipe(**{**lora, "embeddings": "full"})))
    reference = reference_formula(decoder, r=int(lora.get("r", 64)))
    split_extra = LAYERS * 2 * int(lora.get("r", 64)) * HIDDEN  # q/k/v LoRA-A matrices vs one fused wqkv A
    if full["trainable"] - split_extra != reference:
        raise SystemExit(f"the two reference counts disagree: apply_lora(full) {full['trainable']:,} - {split_extra:,} "
                         f"vs formula {reference:,}")
    print(f"recipe {recipe.get('name')}: lora {lora}")
    print(f"all parameters: {ours['all']:,}")
    ref_row = {**full, "lora": full["lora"] - split_extra, "trainable": reference}
    rows = [("ours (res_8b: new token rows)", ours), ("reference (full emb., fused wqkv)", ref_row),
            ("  same, split q/k/v LoRA", full)]
    print(f"{'':34s} {'trainable':>14s} {'lora':>12s} {'decoder':>12s} {'embeddings':>13s} {'norm':>6s} "
          f"{'AdamW state':>11s} {'+ grads':>8s}")
    for name, c in rows:
        n = c["trainable"]
        print(f"{name:34s} {n:14,d} {c['lora']:12,d} {c['mask_decoder']:12,d} {c['embeddings']:13,d} "
              f"{c['final_norm']:6,d} {gib(n * STATE_BYTES):9.2f} GiB {gib(n * GRAD_BYTES):5.2f} GiB")
    ratio = ours["trainable"] / reference
    print(f"trainable ours / reference = {ours['trainable']:,} / {reference:,} = {ratio:.4f} "
          f"(1/{1 / ratio:.2f}); optimizer state {gib(ours['trainable'] * STATE_BYTES):.2f} GiB vs "
          f"{gib(reference * STATE_BYTES):.2f} GiB (12 B per trainable parameter: fp32 master + 2 fp32 moments)")
    print(f"(our count uses split q/k/v; on InternLM2's fused wqkv ours would be {ours['trainable'] - split_extra:,}, "
          f"ratio {(ours['trainable'] - split_extra) / reference:.4f})")
    print(f"RESULT trainable ratio={ratio:.4f} target<=0.25 ours={ours['trainable']} reference={reference}")
    return ratio


if __name__ == "__main__":
    main()
