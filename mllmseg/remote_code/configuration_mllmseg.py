# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""MLLMSeg configuration.

This file travels inside checkpoints as remote code: it imports only transformers, huggingface_hub, the
standard library and its siblings in this folder.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import InternVLConfig

from .compat_mllmseg import SUPPORTED_TRANSFORMERS  # noqa: F401  (importing it refuses an unsupported transformers)

# Tokens MLLMSeg adds to the tokenizer, in the reference order (the first nine exist in InternVL2.5 tokenizers).
IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>"
SEG_TOKEN, REJ_TOKEN = "[SEG]", "[REJ]"
ADDED_TOKENS = (
    IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
    SEG_TOKEN, REJ_TOKEN,
)

MLLMSEG_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, SEG_TOKEN, REJ_TOKEN)


def token_id_fields(tokenizer) -> dict[str, int]:
    """The config's token-id fields (`image_token_id`, `image_start_token_id`, `image_end_token_id`,
    `seg_token_id`, `rej_token_id`) read from a tokenizer; a ValueError names any token it lacks."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in MLLMSEG_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks MLLMSeg's tokens {missing}; add them (mllmseg.base_checkpoint)")
    return {
        "image_token_id": vocab[IMG_CONTEXT_TOKEN],
        "image_start_token_id": vocab[IMG_START_TOKEN],
        "image_end_token_id": vocab[IMG_END_TOKEN],
        "seg_token_id": vocab[SEG_TOKEN],
        "rej_token_id": vocab[REJ_TOKEN],
    }


SEG_TILING_MODES = ("single", "dynamic")
MASK_HEADS = ("dsff", "self1e")


@strict
class MLLMSegConfig(InternVLConfig):
    r"""
    Configuration of [`MLLMSegForConditionalGeneration`]: an InternVL multimodal LLM (vision tower, pixel-shuffle
    projector, any transformers causal LM) plus the DSFF mask decoder of MLLMSeg (arXiv 2508.04107).

    Every mask-decoder size derives from the sub-configs, so the same class covers InternVL2.5 1B-8B and tiny test
    models: the decoder width is the ViT width, the detail grid is ``image_size / patch_size`` (32 at 448/14), the
    semantic grid is that times ``downsample_ratio`` (16), and the `[SEG]` / image projections read the LLM width.

    Args (beyond [`InternVLConfig`]):
        seg_token_id (`int`, *optional*): id of `[SEG]`; each one yields a mask.
        rej_token_id (`int`, *optional*): id of `[REJ]` ("no such object"); yields no mask.
        image_start_token_id / image_end_token_id (`int`, *optional*): ids of `<img>` / `</img>`.
        decoder_num_heads (`int`, defaults to 8): heads of the two DSFF attention blocks.
        decoder_ffn_dim (`int`, *optional*): their FFN width; defaults to the ViT width (the reference).
        decoder_dropout (`float`, defaults to 0.1): dropout inside the attention blocks (the reference).
        upsampler_groups (`int`, defaults to 4): DySample groups.
        lm_loss_weight / bce_loss_weight / dice_loss_weight (`float`, default 1.0): loss weights.
        seg_tiling (`str`, defaults to `"single"`): how `segment` tiles images, `"single"` (one square tile, how the
            released MLLMSeg checkpoints were trained) or `"dynamic"` (InternVL tiling, masks stitched per tile).
        max_dynamic_tiles (`int`, defaults to 12): tile budget of dynamic tiling.
        mask_head (`str`, defaults to `"dsff"`): the mask head, `"dsff"` (MLLMSeg's DSFF decoder) or `"self1e"`
            (SELF1E's decoder-free head: refilled uncompressed image features, one `[SEG]`, and the dual-perception
            attention mask inside the LLM; needs sdpa or eager attention, and `vision_feature_layer=-1`).
    """

    model_type = "mllmseg"

    seg_token_id: int | None = None
    rej_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    decoder_num_heads: int = 8
    decoder_ffn_dim: int | None = None
    decoder_dropout: float | int = 0.1
    upsampler_groups: int = 4
    lm_loss_weight: float | int = 1.0
    bce_loss_weight: float | int = 1.0
    dice_loss_weight: float | int = 1.0
    seg_tiling: str = "single"
    max_dynamic_tiles: int = 12
    mask_head: str = "dsff"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The number of LLM tokens per tile is a consequence of the vision config, never set by hand.
        self.image_seq_length = self.tokens_per_tile
        self.check_mask_decoder()

    def check_mask_decoder(self):
        """Raise a ValueError naming the field when the configuration cannot build a mask decoder."""
        if self.seg_tiling not in SEG_TILING_MODES:
            raise ValueError(f"seg_tiling must be one of {SEG_TILING_MODES}, got {self.seg_tiling!r}")
        if self.mask_head not in MASK_HEADS:
            raise ValueError(f"mask_head must be one of {MASK_HEADS}, got {self.mask_head!r}")
        width = self.vision_config.hidden_size
        if self.mask_head == "self1e" and self.vision_feature_layer != -1:
            # SELF1E refills the features of the layer the LLM sees; the uncompressed path reads the ViT's last layer.
            raise ValueError(
                f"mask_head 'self1e' needs vision_feature_layer=-1 (the ViT's last layer), got {self.vision_feature_layer}"
            )
        if self.mask_head == "dsff" and (width % self.decoder_num_heads != 0 or width % self.upsampler_groups != 0):
            raise ValueError(
                f"unsupported vision width {width} (vision_config.hidden_size): the mask decoder needs a width "
                f"divisible by decoder_num_heads={self.decoder_num_heads} and upsampler_groups={self.upsampler_groups}"
            )
        image_size, patch = self.image_size, self.patch_size
        if image_size % patch != 0:
            raise ValueError(f"vision_config.image_size {image_size} is not a multiple of patch_size {patch}")
        grid = image_size // patch
        if abs(grid * self.downsample_ratio * 2 - grid) > 1e-6 or grid % 2 != 0:
            raise ValueError(
                f"the mask decoder upsamples the LLM grid by 2 to the ViT grid: needs downsample_ratio 0.5 and an even "
                f"ViT grid, got downsample_ratio={self.downsample_ratio}, grid={grid}"
            )

    # Derived sizes -------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        size = self.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def patch_size(self) -> int:
        size = self.vision_config.patch_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def vision_grid(self) -> int:
        """Side of the ViT token grid of one tile (32 for 448 px / patch 14)."""
        return self.image_size // self.patch_size

    @property
    def llm_grid(self) -> int:
        """Side of the LLM image-token grid of one tile after pixel shuffle (16 for InternVL2.5)."""
        return int(round(self.vision_grid * self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        """`<IMG_CONTEXT>` tokens per tile (256 for InternVL2.5)."""
        return self.llm_grid * self.llm_grid


__all__ = ["MLLMSegConfig", "ADDED_TOKENS", "MLLMSEG_TOKENS", "token_id_fields", "SEG_TOKEN", "REJ_TOKEN", "IMG_CONTEXT_TOKEN"]
