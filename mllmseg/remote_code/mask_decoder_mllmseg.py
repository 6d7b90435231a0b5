# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""The DSFF mask decoder of MLLMSeg (arXiv 2508.04107), module by module as the reference `RESDecoder`.

Shapes use: D = ViT width (1024 for InternViT-300M), T = LLM width, G = ViT grid per tile (32),
g = LLM grid per tile (16 = G / 2), P = patch size (14), S = tile size in pixels (G * P = 448).

This file travels inside checkpoints as remote code: it imports only torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DSFFAttentionBlock(nn.Module):
    """One post-norm transformer decoder layer plus a final LayerNorm, batch-first.

    Numerically equal to ``nn.TransformerDecoder(nn.TransformerDecoderLayer(D, heads, ffn, dropout, "relu"), 1,
    norm=nn.LayerNorm(D))`` and laid out with the same parameter names (``layers.0.self_attn.in_proj_weight``, ...,
    ``norm.weight``), so reference weights load as they are. It is written out so that attention runs through
    `scaled_dot_product_attention` on batch-first tensors, and so that cross-attention to a single memory token
    (the `[SEG]` embedding) skips the softmax, which is exactly 1 there.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList([_DecoderLayer(dim, num_heads, ffn_dim, dropout, eps)])
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query `[B, Lq, D]`, memory `[B, Lm, D]` -> `[B, Lq, D]`."""
        return self.attend_memory(self.self_attend(query), memory)

    def self_attend(self, query: torch.Tensor) -> torch.Tensor:
        """The first layer's self-attention sublayer, the only part that does not read the memory:
        `[B, Lq, D]` -> `[B, Lq, D]`. Queries shared by several memories can go through it once."""
        return self.layers[0].self_attention_block(query)

    def attend_memory(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The rest of the block, on the output of [`self_attend`]: `[B, Lq, D]`, `[B, Lm, D]` -> `[B, Lq, D]`."""
        query = self.layers[0].memory_block(query, memory)
        for layer in self.layers[1:]:
            query = layer(query, memory)
        return self.norm(query)


class _DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = dropout
        # nn.MultiheadAttention holds the parameters in the reference layout (fused in_proj, out_proj);
        # the computation below calls scaled_dot_product_attention directly.
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _attention(self, attn: nn.MultiheadAttention, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        dim = query.shape[-1]
        w_q, w_k, w_v = attn.in_proj_weight.split(dim)
        b_q, b_k, b_v = attn.in_proj_bias.split(dim)
        p = self.attn_dropout if self.training else 0.0
        if memory.shape[1] == 1 and p == 0.0:
            # One key: the softmax over it is identically 1, so every query receives the same row, the projected
            # value; `out_proj` runs on that one row per sample and the result is expanded to the Lq queries (not
            # out_proj over Lq equal rows: G*G = 1024 per mask at 448 px). Same parameters, same outputs.
            return attn.out_proj(F.linear(memory, w_v, b_v)).expand(-1, query.shape[1], -1)
        bsz, lq, _ = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = F.linear(query, w_q, b_q).view(bsz, lq, heads, head_dim).transpose(1, 2)
        k = F.linear(memory, w_k, b_k).view(bsz, -1, heads, head_dim).transpose(1, 2)
        v = F.linear(memory, w_v, b_v).view(bsz, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return attn.out_proj(out.transpose(1, 2).reshape(bsz, lq, dim))

    def self_attention_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm1(x + self.dropout1(self._attention(self.self_attn, x, x)))

    def memory_block(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Cross-attention to `memory`, then the feed-forward sublayer."""
        x = self.norm2(x + self.dropout2(self._attention(self.multihead_attn, x, memory)))
        return self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.memory_block(self.self_attention_block(x), memory)


class DySampleUpsampler(nn.Module):
    """DySample, "lp" style with a static scope of 0.25 (Liu et al. 2023), as the reference uses it: x2 upsampling
    by content-aware point sampling. `[B, C, h, w]` -> `[B, C, 2h, 2w]`."""

    def __init__(self, channels: int, scale: int = 2, groups: int = 4):
        super().__init__()
        self.scale = scale
        self.groups = groups
        self.offset = nn.Conv2d(channels, 2 * groups * scale * scale, kernel_size=1)
        # Persistent, as in the reference checkpoints (`upsample_adapter_l.init_pos`).
        self.register_buffer("init_pos", self.initial_positions(), persistent=True)

    def initial_positions(self) -> torch.Tensor:
        """`[1, 2 * groups * scale^2, 1, 1]`: the sub-pixel positions of the `scale x scale` children of a pixel."""
        s = self.scale
        h = torch.arange((-s + 1) / 2, (s - 1) / 2 + 1) / s
        grid = torch.stack(torch.meshgrid(h, h, indexing="ij")).transpose(1, 2)  # [2 (x, y), s, s]
        return grid.repeat(1, self.groups, 1).reshape(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x) * 0.25 + self.init_pos
        bsz, _, h, w = offset.shape
        offset = offset.view(bsz, 2, -1, h, w)
        # Pixel centres (x, y) in input pixels, then normalised to [-1, 1] for grid_sample.
        ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
        xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
        centres = torch.stack(torch.meshgrid(xs, ys, indexing="ij")).transpose(1, 2)  # [2, h, w]
        centres = centres.unsqueeze(1).unsqueeze(0)
        normaliser = torch.tensor([w, h], dtype=x.dtype, device=x.device).view(1, 2, 1, 1, 1)
        coords = 2 * (centres + offset) / normaliser - 1
        coords = F.pixel_shuffle(coords.reshape(bsz, -1, h, w), self.scale)
        coords = coords.view(bsz, 2, -1, self.scale * h, self.scale * w).permute(0, 2, 3, 4, 1).flatten(0, 1)
        # contiguous(): `x` usually arrives channel-strided (a transposed token matrix), and torch's CPU grid_sample
        # returns garbage (NaN, 1e38) for such bfloat16 inputs (seen with torch 2.13); float32 is unaffected.
        out = F.grid_sample(
            x.reshape(bsz * self.groups, -1, h, w).contiguous(), coords, mode="bilinear", align_corners=False,
            padding_mode="border",
        )
        return out.view(bsz, -1, self.scale * h, self.scale * w)


class DSFFMaskDecoder(nn.Module):
    """MLLMSeg's light mask decoder: detail-enhanced, semantic-consistent feature fusion (DSFF) and a pixel-shuffle
    head. ~34.39M parameters at InternVL2.5-8B widths (D=1024, T=4096).

    The decoder is split in two so that everything that does not read the `[SEG]` embedding runs once per tile
    and is reused by every `[SEG]` of that tile (several expressions of one image cost one fusion):

    * [`fuse_image`]: `T_img^1` `[N, G*G, D]` (ViT last layer, no CLS) and `T_img^2` `[N, g*g, T]` (LLM image
      states) -> `T_ds^0` `[N, G*G, D]`, already through the self-attention sublayer of `ca_layer_vl` (its
      queries are `T_ds^0`, and only its cross-attention reads the `[SEG]` embedding).
    * [`decode`]: those rows `[M, G*G, D]` and `[SEG]` embeddings `[M, T]` -> mask logits `[M, S, S]`.

    The reference runs that self-attention once per `[SEG]`, on a copy of the tile's features; the result is the
    same (bit for bit at inference). In training with dropout > 0 the masks of one tile share one dropout draw
    of that sublayer instead of one each.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        vision_grid: int,
        patch_size: int,
        num_heads: int = 8,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        upsampler_groups: int = 4,
    ):
        super().__init__()
        d = vision_dim
        self.vision_grid = vision_grid
        self.llm_grid = vision_grid // 2
        self.patch_size = patch_size
        self.img_llm_down = nn.Linear(text_dim, d)
        self.text_down = nn.Linear(text_dim, d)
        self.ca_layer_v2l = DSFFAttentionBlock(d, num_heads, ffn_dim or d, dropout)
        self.upsample_adapter_l = DySampleUpsampler(d, scale=2, groups=upsampler_groups)
        self.text_out_adapter = nn.Linear(3 * d, d)
        self.ca_layer_vl = DSFFAttentionBlock(d, num_heads, ffn_dim or d, dropout)
        self.conv1 = nn.Sequential(
            nn.Conv2d(d, patch_size * patch_size, kernel_size=3, padding=1),
            nn.BatchNorm2d(patch_size * patch_size),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Conv2d(1, 1, kernel_size=5, padding=2)
        # Tells MLLMSegPreTrainedModel._init_weights to use the reference (xavier) initialisation here.
        for module in self.modules():
            module._reference_init = True

    # -- the mask-head interface the model uses (shared with SELF1EMaskHead) ---------------------------------------
    dual_pass = False  # masks come from the causal pass's states; no second LLM pass

    @property
    def output_grid(self) -> int:
        """Mask logits per tile are `output_grid x output_grid`: the tile size S (G * patch)."""
        return self.vision_grid * self.patch_size

    def tile_inputs(self, model, input_ids, hidden, image_outputs) -> tuple[torch.Tensor, ...]:
        """Per-tile inputs, in tile order: `T_img^1` (the ViT's last layer, CLS dropped) `[N, G*G, D]` and `T_img^2`
        (the LLM states preceding each `<IMG_CONTEXT>`) `[N, g*g, T]`."""
        grid = self.vision_grid
        return image_outputs.last_hidden_state[:, -grid * grid :], model.llm_image_states(input_ids, hidden)

    def fuse_tiles(self, *tile_inputs) -> tuple[torch.Tensor, ...]:
        """`fuse_image` as a tuple of per-tile tensors (row-indexable like every head's)."""
        return (self.fuse_image(*tile_inputs),)

    def decode_masks(self, fused: tuple[torch.Tensor, ...], seg_embeddings) -> tuple[torch.Tensor, None]:
        """`(mask logits [M, S, S], None)`: DSFF has no auxiliary low-resolution output."""
        return self.decode(fused[0], seg_embeddings), None

    def fuse_image(self, vit_features: torch.Tensor, llm_image_states: torch.Tensor) -> torch.Tensor:
        """`[N, G*G, D]`, `[N, g*g, T]` -> `T_ds^0` after `ca_layer_vl`'s self-attention, `[N, G*G, D]`."""
        n, small = vit_features.shape[0], self.llm_grid
        llm = self.img_llm_down(llm_image_states.to(self.img_llm_down.weight.dtype))  # [N, g*g, D]
        vit = vit_features.to(llm.dtype)
        v2l = self.ca_layer_v2l(vit, llm)  # detail queries attend to semantic tokens
        up = self.upsample_adapter_l(llm.transpose(1, 2).reshape(n, -1, small, small))  # [N, D, G, G]
        up = up.flatten(2).transpose(1, 2)
        fused = self.text_out_adapter(torch.cat([v2l, vit, up], dim=-1))  # T_ds^0 [N, G*G, D]
        return self.ca_layer_vl.self_attend(fused)

    def decode(self, fused: torch.Tensor, seg_embeddings: torch.Tensor) -> torch.Tensor:
        """`fused` `[M, G*G, D]` (one row per mask to predict), `seg_embeddings` `[M, T]` -> logits `[M, S, S]`."""
        m, big, p = fused.shape[0], self.vision_grid, self.patch_size
        text = self.text_down(seg_embeddings.to(self.text_down.weight.dtype)).unsqueeze(1)  # [M, 1, D]
        x = self.ca_layer_vl.attend_memory(fused, text)  # [M, G*G, D]
        x = x.transpose(1, 2).reshape(m, -1, big, big)
        x = self.conv1(x)  # [M, P*P, G, G]
        x = F.pixel_shuffle(x, p)  # [M, 1, S, S]
        return self.conv2(x).squeeze(1)

    def forward(
        self, vit_features: torch.Tensor, llm_image_states: torch.Tensor, seg_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """One mask per row: `[M, G*G, D]`, `[M, g*g, T]`, `[M, T]` -> logits `[M, S, S]`."""
        return self.decode(self.fuse_image(vit_features, llm_image_states), seg_embeddings)


def count_mask_decoder_parameters(vision_dim: int, text_dim: int, vision_grid: int = 32, patch_size: int = 14) -> int:
    """Parameter count of the DSFF decoder for given widths, built on the meta device (no memory)."""
    with torch.device("meta"):
        decoder = DSFFMaskDecoder(vision_dim, text_dim, vision_grid, patch_size)
    return sum(math.prod(p.shape) for p in decoder.parameters())


__all__ = ["DSFFMaskDecoder", "DSFFAttentionBlock", "DySampleUpsampler", "count_mask_decoder_parameters"]
