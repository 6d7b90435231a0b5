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
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.internvl.modeling_internvl import InternVLModel

from .compat_mllmseg import CACHE_NAME, cache_kwargs, output_cache, pop_cache
from .configuration_mllmseg import MLLMSegConfig
from .inference_mllmseg import MLLMSegInferenceMixin
from .mask_decoder_mllmseg import DSFFMaskDecoder, DySampleUpsampler
from .self1e_head_mllmseg import SELF1EMaskHead

# Attention implementations that take SELF1E's custom 4D (dual-perception) attention mask as it is.
DUAL_MASK_ATTENTION = ("sdpa", "eager")


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
class MLLMSegCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    transformers' causal LM output (`loss`, `logits`, the cache, `hidden_states`, `attentions`; the cache field is
    `past_key_values` up to transformers 5.23 and `cache` from 5.24, inherited as the installed release names it)
    plus:

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `lm_loss_weight * lm_loss + mask_loss`, when `labels` and/or `masks` are given.
    logits (`torch.FloatTensor` of shape `(B, L, vocab)`): next-token logits.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*): next-token cross-entropy over `labels` (-100 ignored).
    mask_loss (`torch.FloatTensor` of shape `()`, *optional*): `bce_loss_weight * BCE + dice_loss_weight * Dice`
        over the ground-truth masks.
    pred_masks (`list[torch.FloatTensor]`, *optional*): per sample, mask logits `(num_seg, rows * R, cols * R)`,
        one map per `[SEG]` token in order, on the sample's tile canvas (`R x R` per tile: R = S for the DSFF
        decoder, R = 2G (64 at 448 px) for the SELF1E head).
    image_hidden_states (`torch.FloatTensor` of shape `(N, g*g, T)`, *optional*): projected image features of this
        call's tiles (None on cached decoding steps and text-only calls).
    seg_logits (`torch.FloatTensor` of shape `(M, vocab)`, *optional*): the logits that predict each `[SEG]` token
        of `input_ids` (at the position before it), in order, whatever `logits_to_keep` is; the processor's
        `post_process_segmentation` decides `[SEG]` against `[REJ]` from them (teacher-forced evaluation). None in
        one-token calls (decoding steps), where the state before the token belongs to an earlier call.
    seg_sample (`torch.LongTensor` of shape `(M,)`, *optional*): the sample of each of those `[SEG]` tokens.
    """

    lm_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    pred_masks: list[torch.FloatTensor] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    seg_logits: torch.FloatTensor | None = None
    seg_sample: torch.LongTensor | None = None


def build_mask_head(config: MLLMSegConfig) -> nn.Module:
    """The mask head `config.mask_head` names, the one place that reads it. Both heads share one interface:
    `output_grid`, `dual_pass` (masks need a second LLM pass), `tile_inputs(model, input_ids, hidden,
    image_outputs)`, `fuse_tiles(*tile_inputs) -> tuple` (once per tile) and `decode_masks(fused_rows, seg) ->
    (logits, low-resolution logits or None)`."""
    if config.mask_head == "self1e":
        return SELF1EMaskHead(
            text_dim=config.text_config.hidden_size,
            vision_grid=config.vision_grid,
            shuffle_ratio=int(round(1 / config.downsample_ratio)),
        )
    return DSFFMaskDecoder(
        vision_dim=config.vision_config.hidden_size,
        text_dim=config.text_config.hidden_size,
        vision_grid=config.vision_grid,
        patch_size=config.patch_size,
        num_heads=config.decoder_num_heads,
        ffn_dim=config.decoder_ffn_dim,
        dropout=config.decoder_dropout,
        upsampler_groups=config.upsampler_groups,
    )


class MLLMSegPreTrainedModel(PreTrainedModel):
    config: MLLMSegConfig
    config_class = MLLMSegConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _no_split_modules = ["DSFFMaskDecoder", "SELF1EMaskHead"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # As InternVL: a decoding step (one token, no image) traces as one graph (tests/test_generation_paths.py). Full
    # forwards with image and [SEG] tokens do data-dependent mask bookkeeping; generate never compiles those.
    _can_compile_fullgraph = True

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

    With `config.mask_head == "self1e"` the DSFF decoder is replaced by [`SELF1EMaskHead`], fed by the final states
    *at* the `<IMG_CONTEXT>` positions, the compressed image tokens that went into the LLM and the projector applied
    to the uncompressed ViT tokens; a full pass over image and `[SEG]` tokens then runs with the dual-perception 4D
    attention mask ([`dual_perception_mask`]). "Final" states are after the LLM's final norm for both heads: upstream
    SELF1E reads a field named `unnorm_last_hidden_state`, but its Qwen2/Qwen3/InternLM2 wrappers fill it with the
    normed `last_hidden_state`, so the normed state is what it uses (transformers' `hidden_states[-1]` is that same
    normed state too).
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # as InternVL's head (tensor-parallel loading)

    def __init__(self, config: MLLMSegConfig):
        super().__init__(config)
        config.check_mask_decoder()
        self.model = InternVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # The mask head sits at `mask_decoder` whichever it is, so LoRA's modules_to_save, parameter counts and
        # checkpoints treat both heads alike; it is chosen once, here, and used through one interface.
        self.mask_decoder = build_mask_head(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        chosen = "attn_implementation" not in kwargs
        if chosen:
            kwargs["attn_implementation"] = preferred_attn_implementation(kwargs.get("dtype"))
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True gives a tuple
        if loaded.mask_decoder.dual_pass and loaded.llm_attn_implementation() not in DUAL_MASK_ATTENTION:
            if not chosen:
                loaded.check_dual_mask_attention()
            loaded.set_attn_implementation("sdpa")  # we picked flash-attention: SELF1E needs a 4D mask
        return model

    def llm_attn_implementation(self) -> str:
        return str(self.model.language_model.config._attn_implementation or "eager")

    def check_dual_mask_attention(self):
        """SELF1E's dual-perception mask is a custom 4D mask: only sdpa and eager attention take it as it is."""
        impl = self.llm_attn_implementation()
        if impl not in DUAL_MASK_ATTENTION:
            raise ValueError(
                f"mask_head 'self1e' needs its dual-perception 4D attention mask (image tokens attend to each other and "
                f"to the later [SEG]), which attention implementation {impl!r} cannot take; load the model with "
                f"attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa')"
            )

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """`save_pretrained` with this model's own key names (transformers would otherwise write InternVL's legacy
        names back), and, for remote-code checkpoints, `auto_map` entries for both auto classes and the custom
        `image-segmentation` pipeline (`pipeline_mllmseg.py`, which this import makes travel with the model code)."""
        if self._auto_class is not None:
            from .pipeline_mllmseg import PIPELINE_ENTRY, TASK

            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModelForImageTextToText", f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}")
            self.config.auto_map = auto_map
            self.config.custom_pipelines = {TASK: dict(PIPELINE_ENTRY)}
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
        seg_sample, rows = self.slot_rows(input_ids)
        return hidden[seg_sample, rows], seg_sample

    def slot_rows(self, input_ids: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Where each `[SEG]` of `input_ids` is predicted from: `(sample (M,), position (M,))`, the position before each
        `[SEG]`, in order (its state is the `[SEG]` embedding, its logits decide `[SEG]` against `[REJ]`)."""
        seg_sample, seg_pos = (input_ids == self.config.seg_token_id).nonzero(as_tuple=True)
        if seg_pos.numel() and int(seg_pos.min()) == 0:
            raise ValueError("a [SEG] token at position 0 has no preceding state")
        return seg_sample, seg_pos - 1

    def head_logits(
        self, input_ids: torch.LongTensor | None, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor, has_seg: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """`(logits (B, L', vocab), slot logits (M, vocab) or None, their samples (M,) or None)` with one LM-head call.

        `logits` are those of the kept positions (`logits_to_keep`: the last k, 0 for all, or a tensor of positions).
        Where the kept positions do not cover every slot (`segment`'s fast mode keeps 1), the slot rows are gathered
        beside the kept ones and the head runs once on the B * L' + M rows, then the result is split: the head's
        weight (vocab x T, 272 MB at 1B in bf16) is read from memory once instead of twice (issue 21)."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        kept = hidden[:, keep, :]
        covers_all = isinstance(logits_to_keep, int) and kept.shape[1] == hidden.shape[1]
        if not has_seg:
            return self.lm_head(kept), None, None
        seg_sample, rows = self.slot_rows(input_ids)
        if covers_all:
            logits = self.lm_head(kept)
            return logits, logits[seg_sample, rows], seg_sample
        b, length, width = kept.shape
        both = self.lm_head(torch.cat([kept.reshape(b * length, width), hidden[seg_sample, rows]]))
        return both[: b * length].view(b, length, -1), both[b * length :], seg_sample

    def image_token_states(self, input_ids: torch.LongTensor, hidden: torch.Tensor) -> torch.Tensor:
        """SELF1E's LLM image features: `(N, g*g, T)`, the final states *at* each `<IMG_CONTEXT>` (not shifted: with
        the dual-perception mask the image tokens see each other and the `[SEG]`), in tile order."""
        batch_idx, pos = (input_ids == self.config.image_token_id).nonzero(as_tuple=True)
        return hidden[batch_idx, pos].view(-1, self.config.tokens_per_tile, hidden.shape[-1])

    def uncompressed_image_tokens(self, image_outputs) -> torch.Tensor:
        """SELF1E's uncompressed tokens `(N, G*G, T)`: the projector applied to the ViT tokens before pixel shuffle,
        each token's features repeated r*r times to fill the projector's input width (as upstream)."""
        grid = self.config.vision_grid
        vit = image_outputs.last_hidden_state[:, -grid * grid :]  # CLS dropped
        repeat = int(round(1 / self.config.downsample_ratio)) ** 2
        return self.model.multi_modal_projector(vit.repeat(1, 1, repeat))

    def mask_head_inputs(self, input_ids: torch.LongTensor, hidden: torch.Tensor, image_outputs) -> tuple[torch.Tensor, ...]:
        """Per-tile inputs of the mask head, in tile order (see the head's `tile_inputs`)."""
        return self.mask_decoder.tile_inputs(self, input_ids, hidden, image_outputs)

    def dual_perception_mask(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """SELF1E's 4D additive attention mask `(B, 1, L, L)` (0 = attend, dtype min = blocked): causal + padding,
        plus, in samples that hold a `[SEG]`, two perception paths: `<IMG_CONTEXT>` tokens attend to each other both
        ways (image-to-image), and to every `[SEG]` of the sequence, also later ones (image-to-segmentation).
        Text tokens stay causal. Every position attends to itself, so padded rows are never empty (no NaN)."""
        b, length = input_ids.shape
        device = input_ids.device
        keep = (
            torch.ones(b, length, dtype=torch.bool, device=device)
            if attention_mask is None
            else attention_mask.to(device).bool()
        )
        image = input_ids == self.config.image_token_id
        seg = input_ids == self.config.seg_token_id
        image = image & seg.any(1, keepdim=True)  # upstream: the extra paths only where the sample has a [SEG]
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None]
        allowed = allowed | (image[:, :, None] & (image | seg)[:, None, :])
        allowed = (allowed & keep[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
        mask = torch.zeros(b, 1, length, length, dtype=dtype, device=device)
        return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)

    def dual_perception_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        image_outputs,
    ) -> torch.Tensor:
        """SELF1E's mask pass: final LLM states `(B, L, T)` of a full forward with the dual-perception 4D mask.

        Upstream takes the logits from this same pass. There, the text after the image reads the answer's later
        `[SEG]` tokens through the image tokens, so in a teacher-forced pass (training, `fast` mode) the `[SEG]` /
        `[REJ]` decision is handed the answer: the model learns to copy it and rejects nothing (measured: N-acc 0 on
        the synthetic data, `benchmarks/bench_heads.py`). We take the logits from the causal pass and only the
        masks from this one, at the cost of a second LLM pass (the ViT runs once)."""
        self.check_dual_mask_attention()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=self.dual_perception_mask(input_ids, attention_mask, self.dtype),
            position_ids=position_ids,
            use_cache=False,
            mm_encoder_outputs={"image": image_outputs},
        )
        return outputs.last_hidden_state

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
        tile_inputs: tuple[torch.Tensor, ...],
        seg_embeddings: torch.Tensor,
        seg_sample: torch.LongTensor,
        tiles: torch.LongTensor,
        tile_grids: torch.LongTensor | None = None,
    ) -> list[torch.Tensor]:
        """Mask logits per sample, `(num_seg_b, rows * R, cols * R)` (R = S for DSFF, 2G for SELF1E).

        Args:
            tile_inputs: the head's per-tile inputs for every tile in the batch ([`mask_head_inputs`]), e.g. DSFF's
                `T_img^1` `(N, G*G, D)` and `T_img^2` `(N, g*g, T)`.
            seg_embeddings: `(M, T)`, one row per `[SEG]`; `seg_sample` `(M,)` its sample.
            tiles: `(B,)` tiles per sample (in the order of the rows above).
            tile_grids: `(B, 2)` (rows, cols) per sample; only needed where a sample has several tiles.

        Each grid tile is decoded on its own (the thumbnail, if any, only informs the LLM) and the tile masks
        are laid out on the tile canvas. Image fusion runs once per tile, whatever the number of `[SEG]`.
        """
        return self._predict_masks(tile_inputs, seg_embeddings, seg_sample, tiles, tile_grids)[0]

    def _predict_masks(self, tile_inputs, seg_embeddings, seg_sample, tiles, tile_grids=None):
        """`predict_masks`, plus SELF1E's low-resolution logits per sample (its auxiliary loss term; None for DSFF)."""
        batch = tiles.shape[0]
        grids = self._tile_grids(tiles, tile_grids)
        starts = torch.cumsum(tiles, 0) - tiles
        seg_counts = torch.bincount(seg_sample, minlength=batch).tolist()
        if len(seg_sample) == 0:
            res = self.mask_decoder.output_grid
            return [seg_embeddings.new_zeros(0, r * res, c * res) for r, c in grids], None

        # Tiles that some [SEG] needs, fused once each.
        device = seg_embeddings.device
        needed = [
            int(starts[b]) + t for b in range(batch) if seg_counts[b] for t in range(grids[b][0] * grids[b][1])
        ]
        needed_t = torch.tensor(needed, device=device, dtype=torch.long)
        fused = self.mask_decoder.fuse_tiles(*(x[needed_t] for x in tile_inputs))
        row_of_tile = {tile: i for i, tile in enumerate(needed)}

        rows_tile, rows_seg = [], []
        for s, b in enumerate(seg_sample.tolist()):
            for t in range(grids[b][0] * grids[b][1]):
                rows_tile.append(row_of_tile[int(starts[b]) + t])
                rows_seg.append(s)
        rows_tile = torch.tensor(rows_tile, device=device)
        fused_rows = tuple(f[rows_tile] for f in fused)
        logits, low = self.mask_decoder.decode_masks(fused_rows, seg_embeddings[torch.tensor(rows_seg, device=device)])
        # (sum over [SEG] of tiles, R, R); SELF1E also low-res (that, G, G)
        return self._stitch(logits, grids, seg_counts), None if low is None else self._stitch(low, grids, seg_counts)

    @staticmethod
    def _stitch(logits: torch.Tensor, grids: list[tuple[int, int]], seg_counts: list[int]) -> list[torch.Tensor]:
        """Per-(`[SEG]`, tile) maps `(rows_total, R, R)`, tiles in row-major order -> per sample
        `(num_seg_b, rows * R, cols * R)` on the tile canvas."""
        size = logits.shape[-1]
        # One split, not a slice per sample: the backward of B slices writes B zero tensors the size of `logits`
        # (measured: a third of a tiny 224 px training step at batch 8), a split's backward one concatenation.
        lengths = [count * rows * cols for (rows, cols), count in zip(grids, seg_counts)]
        out = []
        for chunk, (rows, cols), count in zip(logits.split(lengths), grids, seg_counts):
            chunk = chunk.view(count, rows, cols, size, size)
            out.append(chunk.permute(0, 1, 3, 2, 4).reshape(count, rows * size, cols * size))
        return out

    # ------------------------------------------------------------------------------------------------------------
    def mask_loss(
        self,
        pred_masks: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        low_res_masks: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """BCE + Dice (the paper's mask loss) between mask logits and ground-truth masks.

        The reference code instead applies sigmoid twice inside a "focal" term; we follow the paper. Each logit map
        is resized bilinearly to its ground-truth mask's size first, so masks can keep their original resolution.
        `masks[b]`: `(num_seg_b, H_b, W_b)` (bool or float), one per `[SEG]` of sample b (`[REJ]` slots get none).

        `low_res_masks` (SELF1E): the head's low-resolution logits; as upstream, their BCE and Dice are added to the
        main ones with the same weights (the auxiliary term that trains the LLM image states directly).
        """
        if len(masks) != len(pred_masks):
            raise ValueError(f"masks has {len(masks)} entries for a batch of {len(pred_masks)} samples")
        bce_terms, dice_terms = [], []
        pairs = list(zip(pred_masks, masks))
        if low_res_masks is not None:
            pairs += list(zip(low_res_masks, masks))
        for i, (pred, gt) in enumerate(pairs):
            b = i % len(masks)
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
        parts = 2 if low_res_masks is not None else 1  # the mean over masks of each term, summed over the terms
        bce, dice = torch.cat(bce_terms).mean() * parts, torch.cat(dice_terms).mean() * parts
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
        num_tiles: torch.LongTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
        **kwargs,
    ) -> MLLMSegCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`(B, L)`): tokens, images already expanded to `<img>` + `<IMG_CONTEXT>` x g*g per tile +
                `</img>` (the processor does this).
            pixel_values (`(N, 3, S, S)`): the tiles of every sample, concatenated in sample order.
            attention_mask (`(B, L)`), position_ids, past_key_values, inputs_embeds, use_cache: as for causal LMs
                (the cache may also come as `cache=`, the name transformers uses from 5.24 on).
            labels (`(B, L)`, *optional*): next-token targets, -100 where no loss is taken.
            masks (`list` of `(num_seg_b, H_b, W_b)`, *optional*): ground-truth masks, one per `[SEG]` of each sample.
            tile_grids (`(B, 2)`, *optional*): (rows, cols) of each sample's tile grid, for samples with several tiles.
            mm_encoder_outputs (*optional*): pre-computed `get_image_features` output (`{"image": ...}`), as
                `generate()` passes it.
            num_tiles, original_sizes (*optional*): the processor's bookkeeping, accepted and unused, so that
                `model(**processor(...))` and `model.generate(**processor(...))` work (post-processing reads them).

        Masks are predicted when the sequence holds both the image and `[SEG]` tokens and no cache is passed (a full
        forward, not a `generate()` call).
        """
        cache = pop_cache(kwargs, past_key_values)
        first_step = cache is None or cache.get_seq_length() == 0
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        # 1. Inputs and image features. Masks need the image tokens in this call and the logits of a [SEG] slot the
        # position before it, so a one-token call (every decoding step) skips the [SEG] search: its Python control flow
        # then depends on shapes only, and torch.compile traces a decoding step as one graph.
        seg_id = self.config.seg_token_id
        has_seg = (
            input_ids is not None and seg_id is not None and input_ids.shape[1] > 1
            and bool((input_ids == seg_id).any())
        )
        image_outputs, tiles = self._image_inputs(input_ids, inputs_embeds, pixel_values, mm_encoder_outputs,
                                                  needs_tiles=has_seg or masks is not None, generating=cache is not None)
        if masks is not None and image_outputs is None:
            raise ValueError("masks were given but there is no image (pixel_values) to predict them from")
        dual_pass = (
            self.mask_decoder.dual_pass and has_seg and image_outputs is not None and first_step
            and (attention_mask is None or attention_mask.dim() == 2)
        )
        if dual_pass:
            self.check_dual_mask_attention()  # before any pass, so the error names the real problem

        # 2. The LLM pass (causal) and the next-token logits.
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs={"image": image_outputs} if image_outputs is not None else None,
            **cache_kwargs(cache),
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits, seg_logits, seg_sample = self.head_logits(input_ids, hidden, logits_to_keep, has_seg)

        # 3. Masks, one per [SEG] (SELF1E: from a second pass with the dual-perception mask). Not inside generate()
        # (a cache is passed): it returns no masks, so those of a prompt's [SEG] (a chat history's answer) were wasted
        # work, and without `tile_grids` they stopped a multi-tile chat (masks of generated [SEG] come from
        # `chat(..., return_masks=True)` / `compute_sequence_masks`).
        pred_masks = low_res_masks = None
        if has_seg and tiles is not None and cache is None:
            mask_states = (
                self.dual_perception_states(input_ids, attention_mask, position_ids, image_outputs)
                if dual_pass
                else hidden
            )
            seg_emb, seg_owner = self.seg_embeddings(input_ids, mask_states)
            pred_masks, low_res_masks = self._predict_masks(
                self.mask_head_inputs(input_ids, mask_states, image_outputs), seg_emb, seg_owner, tiles, tile_grids
            )

        # 4. Losses.
        loss, lm_loss, mask_loss = self._losses(logits, labels, pred_masks, masks, low_res_masks, hidden, **kwargs)

        output = MLLMSegCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            mask_loss=mask_loss,
            logits=logits,
            pred_masks=pred_masks,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=None if image_outputs is None else image_outputs.pooler_output,
            seg_logits=seg_logits,
            seg_sample=seg_sample,
            **cache_kwargs(output_cache(outputs)),
        )
        return output if return_dict else output.to_tuple()

    def _image_inputs(self, input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, needs_tiles: bool = True,
                      generating: bool = False):
        """Checked inputs -> (image features or None, tiles per sample or None). Features come from
        `mm_encoder_outputs` (as `generate()` passes them) or are computed from `pixel_values`. Tiles (the
        bookkeeping of masks) are worked out when masks are needed; during generation a chunk of a chunked prefill
        may hold only part of an image's tokens: it gets no masks (as no decoding step does), and InternVL places the
        features it holds."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and image_outputs is None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
        # Without image features, <IMG_CONTEXT> tokens are text, as in transformers' InternVL (a generated one, or
        # the prefill of an assistant model in assisted decoding, which gets no image inputs).
        tiles = None
        if image_outputs is not None and input_ids is not None and needs_tiles:
            counts = (input_ids == self.config.image_token_id).sum(1)
            if generating and bool((counts % self.config.tokens_per_tile).any()):
                return image_outputs, None
            image_outputs = self._align_expanded_image_outputs(input_ids, image_outputs)
            tiles = self.checked_tiles_per_sample(input_ids, image_outputs.pooler_output.shape[0])
        return image_outputs, tiles

    def checked_tiles_per_sample(self, input_ids: torch.LongTensor, n_tiles: int) -> torch.LongTensor:
        """`tiles_per_sample`, checked against the `n_tiles` tiles of `pixel_values`."""
        tiles = self.tiles_per_sample(input_ids)
        if int(tiles.sum()) != n_tiles:
            raise ValueError(
                f"image tokens and tiles disagree: the text holds {int(tiles.sum())} tiles' worth of <IMG_CONTEXT> "
                f"tokens ({tiles.tolist()} per sample) but pixel_values has {n_tiles} tiles"
            )
        return tiles

    def _align_expanded_image_outputs(self, input_ids, image_outputs):
        """`generate` with beams or `num_return_sequences` repeats each sample E times in `input_ids` and expands the
        projected image tokens (`pooler_output`) to match, but not the ViT states the DSFF decoder reads; expand
        those the same way: expanded sample j has the tiles of original sample j // E."""
        vit, pooled = image_outputs.last_hidden_state, image_outputs.pooler_output
        if vit is None or vit.shape[0] == pooled.shape[0]:
            return image_outputs
        if pooled.shape[0] % vit.shape[0]:
            raise ValueError(f"{pooled.shape[0]} projected image tiles for {vit.shape[0]} ViT tiles")
        times = pooled.shape[0] // vit.shape[0]
        tiles = self.tiles_per_sample(input_ids).tolist()
        originals = tiles[::times]
        starts = [sum(originals[:b]) for b in range(len(originals))]
        index = [starts[j // times] + t for j, n in enumerate(tiles) for t in range(n)]
        aligned = type(image_outputs)(**dict(image_outputs))
        aligned.last_hidden_state = vit[torch.tensor(index, device=vit.device)]
        return aligned

    def _losses(self, logits, labels, pred_masks, masks, low_res_masks, hidden, **kwargs):
        """(loss, lm_loss, mask_loss): `lm_loss_weight * CE` over `labels` plus the mask loss over `masks`."""
        loss = lm_loss = mask_loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = self.config.lm_loss_weight * lm_loss
        if masks is not None:
            if pred_masks is None:
                pred_masks = [hidden.new_zeros(0, 1, 1) for _ in range(hidden.shape[0])]
            mask_loss = self.mask_loss(pred_masks, masks, low_res_masks if self.training else None)
            loss = mask_loss if loss is None else loss + mask_loss
        return loss, lm_loss, mask_loss

__all__ = ["MLLMSegPreTrainedModel", "MLLMSegForConditionalGeneration", "MLLMSegCausalLMOutputWithPast"]
