# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""MLLMSeg: an InternVL multimodal LLM plus the DSFF mask decoder (arXiv 2508.04107).

Shapes use: B = batch, L = sequence length, T = LLM width, D = ViT width, N = tiles in the batch,
G = ViT grid per tile (32 at 448 px), g = LLM grid per tile (16), S = tile size in pixels (448).

This file travels inside checkpoints as remote code: it imports only torch, transformers and its siblings
in this folder, by flat relative imports.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.internvl.modeling_internvl import InternVLModel
from transformers.utils import ModelOutput

from .configuration_mllmseg import MLLMSegConfig
from .inference_mllmseg import MLLMSegInferenceMixin
from .mask_decoder_mllmseg import DSFFMaskDecoder, DySampleUpsampler


def preferred_attn_implementation(dtype: torch.dtype | None = None) -> str:
    """flash-attention 2 only where it can run (CUDA, the `flash_attn` package, half precision), else sdpa.

    `flash_attn` is looked up, never imported here: importing it on a machine without CUDA fails.
    """
    if (
        torch.cuda.is_available()
        and importlib.util.find_spec("flash_attn") is not None
        and dtype in (torch.float16, torch.bfloat16)
    ):
        return "flash_attention_2"
    return "sdpa"


@dataclass
class MLLMSegCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `lm_loss_weight * lm_loss + mask_loss`, when `labels` and/or `masks` are given.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): next-token cross-entropy over `labels` (-100 ignored).
    mask_loss (`torch.FloatTensor` of shape `()`, *optional*): `bce_loss_weight * BCE + dice_loss_weight * Dice`
        over the ground-truth masks.
    logits (`torch.FloatTensor` of shape `(B, L, vocab)`): next-token logits.
    pred_masks (`list[torch.FloatTensor]`, *optional*): per sample, mask logits `(num_seg, rows * S, cols * S)`,
        one map per `[SEG]` token in order, on the sample's tile canvas (`S x S` for one tile).
    past_key_values, hidden_states, attentions: as in transformers' causal LM outputs.
    image_hidden_states (`torch.FloatTensor` of shape `(N, g*g, T)`, *optional*): projected image features.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_masks: list[torch.FloatTensor] | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class MLLMSegPreTrainedModel(PreTrainedModel):
    config: MLLMSegConfig
    config_class = MLLMSegConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["DSFFMaskDecoder"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the mask bookkeeping is data-dependent

    def _init_weights(self, module):
        if getattr(module, "_reference_init", False) and not isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            # Mask decoder (DSFFMaskDecoder tags its modules): the reference initialisation, xavier-uniform on every
            # parameter with more than one dimension. Biases start at zero (the reference leaves some at PyTorch's
            # default uniform init). Loaded weights are left alone by transformers' guarded init functions.
            for param in module.parameters(recurse=False):
                if param.dim() > 1:
                    init.xavier_uniform_(param)
                else:
                    init.zeros_(param)
            if isinstance(module, DySampleUpsampler):
                init.copy_(module.init_pos, module.initial_positions())
            return
        super()._init_weights(module)


class MLLMSegForConditionalGeneration(MLLMSegInferenceMixin, MLLMSegPreTrainedModel, GenerationMixin):
    """InternVL (vision tower, pixel-shuffle projector, causal LM) + `lm_head` + the DSFF mask decoder.

    Feature sources for the decoder, per 448 px tile (SPEC: reference code facts):

    * `T_img^1`: the ViT's last layer, CLS dropped, before pixel shuffle: `[G*G, D]`.
    * `T_img^2`: the LLM's final hidden states at the image positions shifted by one (the state *preceding* each
      `<IMG_CONTEXT>`, i.e. `<img>` and the first g*g - 1 context tokens of the first tile), `[g*g, T]` per tile.
    * the `[SEG]` embedding: the final hidden state at the position before each `[SEG]` token.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MLLMSegConfig):
        super().__init__(config)
        config.check_mask_decoder()
        self.model = InternVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.mask_decoder = DSFFMaskDecoder(
            vision_dim=config.vision_config.hidden_size,
            text_dim=config.text_config.hidden_size,
            vision_grid=config.vision_grid,
            patch_size=config.patch_size,
            num_heads=config.decoder_num_heads,
            ffn_dim=config.decoder_ffn_dim,
            dropout=config.decoder_dropout,
            upsampler_groups=config.upsampler_groups,
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if "attn_implementation" not in kwargs:
            kwargs["attn_implementation"] = preferred_attn_implementation(kwargs.get("dtype"))
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """`save_pretrained` with this model's own key names (transformers would otherwise write InternVL's legacy
        names back), and, for remote-code checkpoints, `auto_map` entries for both auto classes."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModelForImageTextToText", f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """`pixel_values` `(N, 3, S, S)` -> ViT states (`last_hidden_state`, `(N, 1 + G*G, D)`) and projected
        image tokens (`pooler_output`, `(N, g*g, T)`)."""
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Bookkeeping: which tiles belong to which sample, where the image tokens and the [SEG] tokens are.
    # ------------------------------------------------------------------------------------------------------------
    def tiles_per_sample(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """`(B,)` number of tiles of each sample, from its `<IMG_CONTEXT>` count (`tokens_per_tile` per tile)."""
        per_tile = self.config.tokens_per_tile
        counts = (input_ids == self.config.image_token_id).sum(dim=1)
        bad = (counts % per_tile).nonzero().flatten()
        if bad.numel():
            b = int(bad[0])
            raise ValueError(
                f"image tokens and tiles disagree: sample {b} has {int(counts[b])} <IMG_CONTEXT> tokens, "
                f"not a multiple of {per_tile} per tile"
            )
        return counts // per_tile

    def llm_image_states(self, input_ids: torch.LongTensor, hidden: torch.Tensor) -> torch.Tensor:
        """`T_img^2`: `(N, g*g, T)`, the final states preceding each `<IMG_CONTEXT>`, in tile order."""
        batch_idx, pos = (input_ids == self.config.image_token_id).nonzero(as_tuple=True)
        if pos.numel() and int(pos.min()) == 0:
            raise ValueError("an <IMG_CONTEXT> token at position 0 has no preceding state; start images with <img>")
        states = hidden[batch_idx, pos - 1]
        return states.view(-1, self.config.tokens_per_tile, hidden.shape[-1])

    def seg_embeddings(self, input_ids: torch.LongTensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The states preceding each `[SEG]`: `(num_seg_total, T)`, and each one's sample index `(num_seg_total,)`."""
        batch_idx, pos = (input_ids == self.config.seg_token_id).nonzero(as_tuple=True)
        if pos.numel() and int(pos.min()) == 0:
            raise ValueError("a [SEG] token at position 0 has no preceding state")
        return hidden[batch_idx, pos - 1], batch_idx

    @staticmethod
    def _tile_grids(tiles: torch.LongTensor, tile_grids: torch.LongTensor | None) -> list[tuple[int, int]]:
        """(rows, cols) of each sample's tile grid; one tile needs none, several need `tile_grids`."""
        grids = []
        for b, n in enumerate(tiles.tolist()):
            if tile_grids is None:
                if n > 1:
                    raise ValueError(
                        f"sample {b} has {n} tiles: pass tile_grids (rows, cols per sample, from the processor) "
                        "so its masks can be stitched"
                    )
                grids.append((1, 1))
                continue
            rows, cols = (int(v) for v in tile_grids[b])
            if n not in (rows * cols, rows * cols + 1):  # +1: the thumbnail InternVL appends to a grid
                raise ValueError(f"sample {b} has {n} tiles but tile_grids says {rows}x{cols}")
            grids.append((rows, cols))
        return grids

    def predict_masks(
        self,
        vit_features: torch.Tensor,
        llm_image_states: torch.Tensor,
        seg_embeddings: torch.Tensor,
        seg_sample: torch.LongTensor,
        tiles: torch.LongTensor,
        tile_grids: torch.LongTensor | None = None,
    ) -> list[torch.Tensor]:
        """Mask logits per sample, `(num_seg_b, rows * S, cols * S)`.

        Args:
            vit_features: `(N, G*G, D)`, `T_img^1` of every tile in the batch.
            llm_image_states: `(N, g*g, T)`, `T_img^2` of every tile.
            seg_embeddings: `(M, T)`, one row per `[SEG]`; `seg_sample` `(M,)` its sample.
            tiles: `(B,)` tiles per sample (in the order of the rows above).
            tile_grids: `(B, 2)` (rows, cols) per sample; only needed where a sample has several tiles.

        Each grid tile is decoded on its own (the thumbnail, if any, only informs the LLM) and the tile masks
        are laid out on the tile canvas. Image fusion runs once per tile, whatever the number of `[SEG]`.
        """
        batch = tiles.shape[0]
        size = self.config.image_size
        grids = self._tile_grids(tiles, tile_grids)
        starts = torch.cumsum(tiles, 0) - tiles
        seg_counts = torch.bincount(seg_sample, minlength=batch).tolist()
        if len(seg_sample) == 0:
            return [seg_embeddings.new_zeros(0, r * size, c * size) for r, c in grids]

        # Tiles that some [SEG] needs, fused once each.
        needed = [
            int(starts[b]) + t for b in range(batch) if seg_counts[b] for t in range(grids[b][0] * grids[b][1])
        ]
        needed_t = torch.tensor(needed, device=vit_features.device, dtype=torch.long)
        fused = self.mask_decoder.fuse_image(vit_features[needed_t], llm_image_states[needed_t])
        row_of_tile = {tile: i for i, tile in enumerate(needed)}

        rows_tile, rows_seg = [], []
        for s, b in enumerate(seg_sample.tolist()):
            for t in range(grids[b][0] * grids[b][1]):
                rows_tile.append(row_of_tile[int(starts[b]) + t])
                rows_seg.append(s)
        device = vit_features.device
        logits = self.mask_decoder.decode(
            fused[torch.tensor(rows_tile, device=device)], seg_embeddings[torch.tensor(rows_seg, device=device)]
        )  # (sum over [SEG] of tiles, S, S)

        out, cursor = [], 0
        for b in range(batch):
            rows, cols = grids[b]
            n = seg_counts[b] * rows * cols
            chunk = logits[cursor : cursor + n].view(seg_counts[b], rows, cols, size, size)
            out.append(chunk.permute(0, 1, 3, 2, 4).reshape(seg_counts[b], rows * size, cols * size))
            cursor += n
        return out

    # ------------------------------------------------------------------------------------------------------------
    def mask_loss(self, pred_masks: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
        """BCE + Dice (the paper's mask loss) between mask logits and ground-truth masks.

        The reference code instead applies sigmoid twice inside a "focal" term; we follow the paper. Each logit map
        is resized bilinearly to its ground-truth mask's size first, so masks can keep their original resolution.
        `masks[b]`: `(num_seg_b, H_b, W_b)` (bool or float), one per `[SEG]` of sample b (`[REJ]` slots get none).
        """
        if len(masks) != len(pred_masks):
            raise ValueError(f"masks has {len(masks)} entries for a batch of {len(pred_masks)} samples")
        bce_terms, dice_terms = [], []
        for b, (pred, gt) in enumerate(zip(pred_masks, masks)):
            n_gt = 0 if gt is None else gt.shape[0]
            if n_gt != pred.shape[0]:
                raise ValueError(
                    f"sample {b}: {n_gt} ground-truth masks for {pred.shape[0]} [SEG] tokens; give one mask per [SEG] "
                    "(none for [REJ])"
                )
            if n_gt == 0:
                continue
            logit = F.interpolate(pred[:, None].float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
            logit, target = logit[:, 0].flatten(1), gt.to(logit.device).float().flatten(1)
            bce_terms.append(F.binary_cross_entropy_with_logits(logit, target, reduction="none").mean(1))
            prob = logit.sigmoid()
            dice_terms.append(1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1))
        if not bce_terms:
            # No [SEG] in the batch: a zero that still touches every decoder parameter, so data-parallel training
            # sees the same graph on every rank.
            return sum(p.sum() for p in self.mask_decoder.parameters()) * 0.0
        bce, dice = torch.cat(bce_terms).mean(), torch.cat(dice_terms).mean()
        return self.config.bce_loss_weight * bce + self.config.dice_loss_weight * dice

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        masks: list[torch.Tensor | None] | None = None,
        tile_grids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> MLLMSegCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`(B, L)`): tokens, images already expanded to `<img>` + `<IMG_CONTEXT>` x g*g per tile +
                `</img>` (the processor does this).
            pixel_values (`(N, 3, S, S)`): the tiles of every sample, concatenated in sample order.
            attention_mask (`(B, L)`), position_ids, past_key_values, inputs_embeds, use_cache: as for causal LMs.
            labels (`(B, L)`, *optional*): next-token targets, -100 where no loss is taken.
            masks (`list` of `(num_seg_b, H_b, W_b)`, *optional*): ground-truth masks, one per `[SEG]` of each sample.
            tile_grids (`(B, 2)`, *optional*): (rows, cols) of each sample's tile grid, for samples with several tiles.
            mm_encoder_outputs (*optional*): pre-computed `get_image_features` output (`{"image": ...}`), as
                `generate()` passes it.

        Masks are predicted when the sequence holds both the image and `[SEG]` tokens (a full forward, not a cached
        generation step).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        has_image_tokens = input_ids is not None and bool((input_ids == self.config.image_token_id).any())
        if has_image_tokens and pixel_values is None and image_outputs is None:
            raise ValueError(
                "input_ids contain <IMG_CONTEXT> image tokens but no pixel_values were given; pass the processor's "
                "pixel_values (or remove the image tokens)"
            )
        if pixel_values is not None and image_outputs is None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
        if image_outputs is not None and input_ids is not None:
            tiles = self.tiles_per_sample(input_ids)
            n_tiles = image_outputs.pooler_output.shape[0]
            if int(tiles.sum()) != n_tiles:
                raise ValueError(
                    f"image tokens and tiles disagree: the text holds {int(tiles.sum())} tiles' worth of <IMG_CONTEXT> "
                    f"tokens ({tiles.tolist()} per sample) but pixel_values has {n_tiles} tiles"
                )

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs={"image": image_outputs} if image_outputs is not None else None,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])

        pred_masks = None
        has_seg = input_ids is not None and bool((input_ids == self.config.seg_token_id).any())
        if has_seg and image_outputs is not None:
            grid = self.config.vision_grid
            vit_features = image_outputs.last_hidden_state[:, -grid * grid :]  # CLS dropped
            seg_emb, seg_sample = self.seg_embeddings(input_ids, hidden)
            pred_masks = self.predict_masks(
                vit_features, self.llm_image_states(input_ids, hidden), seg_emb, seg_sample, tiles, tile_grids
            )
        elif has_seg and not has_image_tokens and (past_key_values is None or past_key_values.get_seq_length() == 0):
            raise ValueError("the text has [SEG] tokens but no image to segment")
        elif masks is not None and image_outputs is None:
            raise ValueError("masks were given but there is no image (pixel_values) to predict them from")

        loss = lm_loss = mask_loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = self.config.lm_loss_weight * lm_loss
        if masks is not None:
            if pred_masks is None:
                pred_masks = [hidden.new_zeros(0, 1, 1) for _ in range(hidden.shape[0])]
            mask_loss = self.mask_loss(pred_masks, masks)
            loss = mask_loss if loss is None else loss + mask_loss

        return MLLMSegCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            mask_loss=mask_loss,
            logits=logits,
            pred_masks=pred_masks,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = ["MLLMSegPreTrainedModel", "MLLMSegForConditionalGeneration", "MLLMSegCausalLMOutputWithPast"]
