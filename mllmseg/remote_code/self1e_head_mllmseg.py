# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""The SELF1E mask head (Zhang et al., CVPR 2026, "Rethinking MLLM Itself as a Segmenter with a Single
Segmentation Token"): no decoder, one `[SEG]` token, masks as a scaled dot product between the projected `[SEG]`
embedding and image features refilled at the ViT's uncompressed resolution.

Shapes use: T = LLM width, G = ViT grid per tile (32 at 448 px), g = LLM grid per tile (G / r, 16),
r = 1 / downsample_ratio (2), N = tiles, M = masks to predict (one row per (`[SEG]`, tile) pair).

Per tile (SELF1E's "residual features refilling" and "residual features amplifier"):

* `llm`   = `llm_proj(H_img)`: the LLM's final states at the `<IMG_CONTEXT>` positions, `[g*g, T] -> [g*g, r*r*T]`.
* `comp`  = `vit_proj(X_c)`: the compressed image tokens that went into the LLM (pixel shuffle + projector),
  `[g*g, T] -> [g*g, r*r*T]`.
* residual = unshuffle(`llm - comp`): `[G, G, T]` (pixel unshuffle undoes InternVL's pixel shuffle).
* `unc`   = unshuffle(`vit_proj(X_u)`): `X_u` = the projector applied to the ViT tokens *before* pixel shuffle,
  each token's features repeated r*r times to fill the projector's input width: `[G*G, T] -> [2G, 2G, T]`.
* refilled = `refill_proj(unc + bilinear(residual, 2G x 2G))`: `[2G, 2G, T]` (64 x 64 per 448 tile).
* `[SEG]`: `refill_proj(mean over the r*r blocks of llm_proj(h_seg))`: `[T]`.
* logits = refilled . seg / sqrt(T): `[2G, 2G]`; training adds a low-resolution term,
  unshuffle(`llm`) . seg / sqrt(T): `[G, G]`.

This file travels inside checkpoints as remote code: it imports only torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def unshuffle_tokens(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """The inverse of InternVL's pixel shuffle (`InternVLModel.pixel_shuffle`, ratio 1/r): `[..., h, w, r*r*C]` ->
    `[..., h*r, w*r, C]`. Channel block `k = r*dy + dx` of token (i, j) goes to pixel (r*i + dy, r*j + dx)."""
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h, w, ratio, ratio, c // (ratio * ratio))
    x = x.transpose(-4, -3)  # [..., h, r(dy), w, r(dx), C]
    return x.reshape(*lead, h * ratio, w * ratio, c // (ratio * ratio))


class _MLP(nn.Sequential):
    """Linear -> GELU -> Linear (SELF1E's projection shape)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class SELF1EMaskHead(nn.Module):
    """Decoder-free SELF1E mask head: three MLPs, no attention, no convolution.

    Same two-step interface as the DSFF decoder, so the model shares the tile bookkeeping and stitching:

    * [`fuse_image`]: per tile, LLM image states `[N, g*g, T]`, compressed tokens `[N, g*g, T]` and uncompressed
      tokens `[N, G*G, T]` -> (refilled features `[N, 2G, 2G, T]`, low-resolution features `[N, G, G, T]`).
    * [`decode`]: those rows `[M, ...]` and `[SEG]` states `[M, T]` -> (logits `[M, 2G, 2G]`, low-res logits
      `[M, G, G]`).

    Module names (upstream name in brackets): `refill_proj` [`combine_decode_proj`], `llm_proj`
    [`combine_decode_proj_all`], `vit_proj` [`combine_decode_proj_ori`].
    """

    def __init__(self, text_dim: int, vision_grid: int, shuffle_ratio: int = 2):
        super().__init__()
        t, k = text_dim, shuffle_ratio * shuffle_ratio
        self.text_dim = text_dim
        self.vision_grid = vision_grid
        self.llm_grid = vision_grid // shuffle_ratio
        self.shuffle_ratio = shuffle_ratio
        self.refill_proj = _MLP(t, t, t)
        self.llm_proj = _MLP(t, t, k * t)
        self.vit_proj = _MLP(t, t, k * t)
        # MLLMSegPreTrainedModel._init_weights: xavier-uniform weights and zero biases, as for the DSFF decoder.
        # (Upstream means to xavier-init "combine_proj*" by name, but its modules are named "combine_decode_proj*",
        # so they keep PyTorch's default init; we use one init rule for both heads.)
        for module in self.modules():
            module._reference_init = True

    # -- the mask-head interface the model uses (shared with DSFFMaskDecoder) -----------------------------------------
    dual_pass = True  # masks come from a second LLM pass with the dual-perception attention mask

    def tile_inputs(self, model, input_ids, hidden, image_outputs) -> tuple[torch.Tensor, ...]:
        """Per-tile inputs, in tile order: the LLM states *at* the `<IMG_CONTEXT>` tokens, the compressed image
        tokens that went into the LLM and the projector applied to the uncompressed ViT tokens."""
        return (
            model.image_token_states(input_ids, hidden),
            image_outputs.pooler_output,
            model.uncompressed_image_tokens(image_outputs),
        )

    def fuse_tiles(self, *tile_inputs) -> tuple[torch.Tensor, ...]:
        return self.fuse_image(*tile_inputs)

    def decode_masks(self, fused: tuple[torch.Tensor, ...], seg_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mask logits [M, 2G, 2G], low-resolution logits [M, G, G])`."""
        return self.decode(fused, seg_embeddings)

    @property
    def output_grid(self) -> int:
        """Mask logits per tile are `output_grid x output_grid` (2G: 64 for a 448 px tile with patch 14)."""
        return self.vision_grid * self.shuffle_ratio

    def fuse_image(
        self, llm_image_states: torch.Tensor, compressed: torch.Tensor, uncompressed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r, small, big = self.shuffle_ratio, self.llm_grid, self.vision_grid
        n = llm_image_states.shape[0]
        dtype = self.llm_proj[0].weight.dtype
        llm = self.llm_proj(llm_image_states.to(dtype)).view(n, small, small, -1)  # [N, g, g, r*r*T]
        comp = self.vit_proj(compressed.to(dtype)).view(n, small, small, -1)
        residual = unshuffle_tokens(llm - comp, r)  # [N, G, G, T]
        unc = unshuffle_tokens(self.vit_proj(uncompressed.to(dtype)).view(n, big, big, -1), r)  # [N, 2G, 2G, T]
        residual = F.interpolate(
            residual.permute(0, 3, 1, 2), size=unc.shape[1:3], mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
        refilled = self.refill_proj(unc + residual)  # [N, 2G, 2G, T]
        return refilled, unshuffle_tokens(llm, r)

    def project_seg(self, seg_embeddings: torch.Tensor) -> torch.Tensor:
        """`[M, T]` -> `[M, T]`: llm_proj, mean over the r*r channel blocks (= unshuffle to r x r, spatial mean),
        refill_proj."""
        m = seg_embeddings.shape[0]
        seg = self.llm_proj(seg_embeddings.to(self.llm_proj[0].weight.dtype))
        seg = seg.view(m, self.shuffle_ratio * self.shuffle_ratio, -1).mean(1)
        return self.refill_proj(seg)

    def decode(
        self, fused: tuple[torch.Tensor, torch.Tensor], seg_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        refilled, low = fused
        seg = self.project_seg(seg_embeddings)  # [M, T]
        scale = 1.0 / math.sqrt(self.text_dim)
        high = torch.einsum("mhwc,mc->mhw", refilled, seg) * scale
        low = torch.einsum("mhwc,mc->mhw", low, seg) * scale
        return high, low


def count_self1e_parameters(text_dim: int, shuffle_ratio: int = 2) -> int:
    """Parameter count of the SELF1E head for an LLM width, built on the meta device (no memory)."""
    with torch.device("meta"):
        head = SELF1EMaskHead(text_dim, vision_grid=2 * shuffle_ratio, shuffle_ratio=shuffle_ratio)
    return sum(math.prod(p.shape) for p in head.parameters())


__all__ = ["SELF1EMaskHead", "unshuffle_tokens", "count_self1e_parameters"]
