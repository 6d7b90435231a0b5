"""Tiny MLLMSeg models and a real tokenizer trained locally, for tests, benchmarks and the quickstart.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained with `tokenizers` on a small corpus of
chat, prompt and referring-expression text, with the chat tokens, image tokens, `[SEG]` and `[REJ]` added.
"""
from __future__ import annotations

import math

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLVisionConfig, PreTrainedTokenizerFast
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

from .remote_code.configuration_mllmseg import ADDED_TOKENS, REJ_TOKEN, SEG_TOKEN, MLLMSegConfig, token_id_fields
from .remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
from .remote_code.processing_mllmseg import MLLMSegProcessor

CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = [
    "system user assistant You are a helpful assistant that segments what a sentence refers to.",
    "What is {} in this image? Please output segmentation mask.",
    "What are {} in this image? Please output segmentation masks.",
    "Can you segment {} in this image? Please respond with segmentation masks.",
    "Sure, it is [SEG]. Sure, they are [SEG], [SEG]. Sure, the segmentation result is [SEG]. [REJ]",
    "the red green blue yellow purple orange white black gray pink brown cyan magenta colour color",
    "circle square rectangle triangle ellipse star shape shapes object objects thing things",
    "left right top bottom middle center leftmost rightmost topmost bottommost upper lower",
    "big bigger biggest large larger largest small smaller smallest tiny huge",
    "all both two three every one none no there is are a an the of in on at to and or with",
    "man woman person people dog cat car bus chair table shirt",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ' \" ( ) [ ] { } - _ / \\",
]


def build_tiny_tokenizer(vocab_size: int = 512, with_seg_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Qwen2-style: no BOS, `<|im_end|>` ends a turn) with MLLMSeg's tokens added.

    `with_seg_tokens=False` leaves out `[SEG]` / `[REJ]`, like a base InternVL2.5 tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line.replace("{}", "the red circle") for line in _CORPUS] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in ADDED_TOKENS if with_seg_tokens or t not in (SEG_TOKEN, REJ_TOKEN)],
        model_max_length=4096,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    text_model_type: str = "qwen2",
    image_size: int = 112,
    patch_size: int = 14,
    vision_width: int = 64,
    text_width: int = 64,
    vision_layers: int = 2,
    text_layers: int = 2,
    vision_heads: int | None = None,
    **overrides,
) -> MLLMSegConfig:
    """A small random MLLMSeg config whose token ids come from `tokenizer`.

    `text_model_type` is any transformers causal LM type with the usual fields ("qwen2", "llama", ...).
    `vision_heads`: the ViT's attention heads (default one per 16 channels, at least 2).
    """
    heads = max(2, text_width // 16)
    text_config = {
        "model_type": text_model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": text_width,
        "intermediate_size": 2 * text_width,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    vision_config = InternVLVisionConfig(
        hidden_size=vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or max(2, vision_width // 16),
        intermediate_size=2 * vision_width,
        image_size=image_size,
        patch_size=patch_size,
    )
    return MLLMSegConfig(
        vision_config=vision_config,
        text_config=text_config,
        **token_id_fields(tokenizer),
        tie_word_embeddings=False,
        **overrides,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    sincos_positions: bool = False,
    **config_kwargs,
) -> tuple[MLLMSegForConditionalGeneration, PreTrainedTokenizerFast]:
    """A random tiny model and its tokenizer, deterministic for a given seed.

    `sincos_positions`: start the ViT's absolute position embeddings as a 2D sin-cos table instead of transformers'
    zeros (recipe key `model.tiny.sincos_positions`). A real InternViT arrives pretrained, with position embeddings
    that already say where each patch is; a random tiny ViT must learn them from the mask loss alone, and from zeros
    its features hardly encode position (a linear probe reads the patch column with R^2 0.24, against 0.91 from the
    sin-cos start). Off by default: it did not dependably improve the from-scratch quickstart (README, "From scratch:
    the first quickstart"), and random test models built with it give masks that barely depend on the expression.
    The `tiny_base` recipe (the shipped pretrained base) turns it on.
    """
    tokenizer = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = MLLMSegForConditionalGeneration(tiny_config(tokenizer, **config_kwargs))
    if sincos_positions:
        embeddings = model.model.vision_tower.embeddings.position_embeddings  # [1, 1 + grid^2, D], CLS first
        grid = math.isqrt(embeddings.shape[1] - 1)
        with torch.no_grad():
            embeddings[0, 0].zero_()
            embeddings[0, 1:].copy_(sincos_position_embeddings(grid, embeddings.shape[-1]))
    return model.eval(), tokenizer


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """`[grid * grid, dim]` 2D sin-cos position embeddings (MAE style), rows in raster order: the first half of the
    channels encodes the column, the second half the row, each as sines and cosines of geometric frequencies.

    transformers' MAE table with its two halves swapped (it puts the row first): column first is the layout the
    README's sin-cos runs were measured with."""
    table = build_2d_sinusoidal_position_embedding(grid, grid, dim)  # raises unless dim % 4 == 0
    return torch.cat([table[:, dim // 2 :], table[:, : dim // 2]], dim=1)


def build_processor(tokenizer, config: MLLMSegConfig, system_message: str | None = None) -> MLLMSegProcessor:
    """The processor for a tiny model (`MLLMSegProcessor.for_model_config`, the factory every backbone uses)."""
    return MLLMSegProcessor.for_model_config(tokenizer, config, system_message=system_message)
