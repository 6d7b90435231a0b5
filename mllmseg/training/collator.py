"""Batches of training conversations for `MLLMSegForConditionalGeneration.forward`."""
from __future__ import annotations

from typing import Any


class MLLMSegCollator:
    """Runs the processor over a list of `ConversationDataset` items.

    The processor pads the texts (right, `attention_mask` 0) and sets `labels` to -100 outside the answers and on
    padding; `pixel_values` concatenates every sample's tiles (samples may have different tile counts, `tile_grids`
    says how they are laid out); `masks` stays a list, one `(num_seg, H, W)` tensor (or None) per sample at the
    sample's original size, since the model resizes its mask logits to each ground truth.

    Args:
        processor: an `MLLMSegProcessor`.
        tiling: "single" (the reference training) or "dynamic".
        max_tiles: tile budget for dynamic tiling.
        max_length: refuse longer conversations (the processor raises a clear error) instead of truncating them.
    """

    model_input_names = ("input_ids", "attention_mask", "labels", "pixel_values", "tile_grids", "masks")

    def __init__(self, processor, tiling: str = "single", max_tiles: int | None = None, max_length: int | None = None):
        self.processor = processor
        self.tiling = tiling
        self.max_tiles = max_tiles
        self.max_length = max_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("empty batch")
        encoded = self.processor(
            images=[f["image"] for f in features],
            text=[f["question"] for f in features],
            answers=[f["answer"] for f in features],
            tiling=self.tiling,
            max_tiles=self.max_tiles,
            max_length=self.max_length,
        )
        seg_id = self.processor.seg_token_id
        masks = []
        for i, f in enumerate(features):
            m = f.get("masks")
            n_seg = int((encoded["input_ids"][i] == seg_id).sum())
            n_gt = 0 if m is None else int(m.shape[0])
            if n_seg != n_gt:
                raise ValueError(f"batch item {i}: {n_seg} [SEG] tokens in the conversation but {n_gt} masks")
            masks.append(m)
        batch = {k: encoded[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "tile_grids")}
        batch["masks"] = masks
        return batch


__all__ = ["MLLMSegCollator"]
