# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""Inference API of MLLMSeg models: InternVL-compatible `chat` / `batch_chat`, and `segment`.

Shapes use: B = conversations, L = tokens, T = LLM width, S = tile size, (h, w) = original image size.

This file travels inside checkpoints as remote code: it imports only torch, transformers and its siblings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conversation_mllmseg import IMAGE_PLACEHOLDER, INTERNVL_SYSTEM_MESSAGE, evaluation_prompt, render_conversation
from .processing_mllmseg import MLLMSegProcessor

SEGMENT_MODES = ("fast", "generate")


@dataclass
class SegmentationResult:
    """What `segment` returns for one image.

    Attributes:
        expressions: the expressions, in order.
        masks: `(E, h, w)` bool, at the original image size (all False where rejected).
        boxes: `(E, 4)` float xyxy, inclusive pixel indices ([0, 0, 0, 0] for an empty mask).
        scores: `(E,)` mask confidence: mean probability over the mask's pixels (0 for an empty mask).
        seg_probs: `(E,)` probability of `[SEG]` against `[REJ]` at the expression's slot.
        rejected: `(E,)` bool, the model answered `[REJ]` (no such object).
        text: the answer text (teacher-forced in `fast` mode, generated in `generate` mode).
        probabilities: `(E, h, w)` mask probabilities.
        rle: COCO RLE per mask, when asked for.
    """

    expressions: list[str]
    masks: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    seg_probs: torch.Tensor
    rejected: torch.Tensor
    text: str
    probabilities: torch.Tensor | None = None
    rle: list[dict] | None = field(default=None)


def _left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Move each row's padding to the left (generation continues every row from its last column)."""
    lengths = attention_mask.sum(1)
    width = input_ids.shape[1]
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    for i, n in enumerate(lengths.tolist()):
        ids[i, width - n :] = input_ids[i][attention_mask[i].bool()]
        mask[i, width - n :] = 1
    return ids, mask


class _FinalStateRecorder:
    """Keeps the LLM's final hidden states of every forward during `generate` (a forward hook on the language
    model), so that masks come from the states of the generation itself, with no second prefill."""

    def __init__(self, language_model):
        self.states: list[torch.Tensor] = []
        self.handle = language_model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.states.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def sequence_states(self) -> torch.Tensor:
        """`(B, L_total - 1, T)`: the state at every position whose successor is known."""
        return torch.cat(self.states, dim=1)

    def close(self):
        self.handle.remove()


class MLLMSegInferenceMixin:
    """`chat`, `batch_chat` (InternVL signatures) and `segment` for [`MLLMSegForConditionalGeneration`]."""

    system_message = INTERNVL_SYSTEM_MESSAGE

    # -- shared pieces --------------------------------------------------------------------------------------------
    def _image_outputs(self, pixel_values):
        return self.get_image_features(pixel_values.to(self.device, self.dtype), return_dict=True)

    def _generate_with_states(self, input_ids, attention_mask, image_outputs, generation_config: dict):
        """Greedy/sampled generation that also returns the final hidden state of every position
        `(B, L_prompt + new - 1, T)`; image features are computed once, outside `generate`."""
        recorder = _FinalStateRecorder(self.model.language_model)
        try:
            sequences = self.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                mm_encoder_outputs={"image": image_outputs} if image_outputs is not None else None,
                **generation_config,
            )
            states = recorder.sequence_states()
        finally:
            recorder.close()
        return sequences, states

    def _masks_from_states(self, sequences, states, image_outputs, tile_grids, prompt_attention_mask=None,
                           eos_token_id=None):
        """Mask logits per sequence from recorded states (`states[:, p]` is the state at position p).

        SELF1E: its image tokens attend to the later `[SEG]` (dual-perception mask), which generation could not
        know yet, so masks come from one full forward over prompt + answer with that mask instead."""
        if self.config.mask_head == "self1e":
            return self._masks_from_full_pass(sequences, prompt_attention_mask, image_outputs, tile_grids, eos_token_id)
        ids = sequences[:, : states.shape[1] + 1]
        hidden = torch.cat([states, states[:, -1:]], dim=1)  # pad so positions index as in a full forward
        tiles = self.tiles_per_sample(ids)
        seg_emb, seg_sample = self.seg_embeddings(ids, hidden)
        return self.predict_masks(self.mask_head_inputs(ids, hidden, image_outputs), seg_emb, seg_sample, tiles, tile_grids)

    def _masks_from_full_pass(self, sequences, prompt_attention_mask, image_outputs, tile_grids, eos_token_id):
        """One forward over generated sequences (prompt left-padded, answer up to its end-of-turn token) with the
        image features of the generation; positions count real tokens only, as in a right-padded forward."""
        mask = torch.ones_like(sequences)
        if prompt_attention_mask is not None:
            mask[:, : prompt_attention_mask.shape[1]] = prompt_attention_mask
        if eos_token_id is not None:
            prompt_len = 0 if prompt_attention_mask is None else prompt_attention_mask.shape[1]
            new = sequences[:, prompt_len:] == eos_token_id
            after_eos = (new.cumsum(1) - new.long()) > 0  # tokens after the first end-of-turn are padding
            mask[:, prompt_len:] = (~after_eos).long()
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        tiles = self.tiles_per_sample(sequences)
        grids = self._tile_grids(tiles, tile_grids)
        size = self.mask_decoder.output_grid
        masks = [sequences.new_zeros(0, r * size, c * size, dtype=self.dtype) for r, c in grids]
        rows = ((sequences == self.config.seg_token_id) & mask.bool()).any(1).nonzero().flatten()
        if rows.numel() == 0:  # no [SEG] generated: no pass
            return masks
        # Only the rows that produced a [SEG], with their own tiles.
        starts = (torch.cumsum(tiles, 0) - tiles).tolist()
        tile_rows = torch.cat([torch.arange(starts[b], starts[b] + int(tiles[b]), device=sequences.device)
                               for b in rows.tolist()])
        image = type(image_outputs)(last_hidden_state=image_outputs.last_hidden_state[tile_rows],
                                    pooler_output=image_outputs.pooler_output[tile_rows])
        ids = sequences[rows]
        hidden = self.dual_perception_states(ids, mask[rows], position_ids[rows], image)
        seg_emb, seg_sample = self.seg_embeddings(ids, hidden)
        found = self.predict_masks(self.mask_head_inputs(ids, hidden, image), seg_emb, seg_sample,
                                   self.tiles_per_sample(ids), None if tile_grids is None else tile_grids[rows])
        for i, b in enumerate(rows.tolist()):
            masks[b] = found[i]
        return masks

    def _eos_token_id(self, tokenizer) -> int:
        return tokenizer.convert_tokens_to_ids("<|im_end|>")

    # -- InternVL-compatible chat ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def batch_chat(
        self,
        tokenizer,
        pixel_values,
        questions: list[str],
        generation_config: dict,
        num_patches_list: list[int] | None = None,
        history=None,
        return_history: bool = False,
        IMG_START_TOKEN: str = "<img>",  # noqa: N803 (InternVL's argument names)
        IMG_END_TOKEN: str = "</img>",  # noqa: N803
        IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>",  # noqa: N803
        verbose: bool = False,
        image_counts=None,
        return_masks: bool = False,
        tile_grids: torch.Tensor | None = None,
    ):
        """InternVL's `batch_chat`: one question per image (its tiles `num_patches_list[i]`), one answer each.

        With `return_masks=True` also returns, per answer, the mask logits of its `[SEG]` tokens on the tile canvas
        `(num_seg, rows * S, cols * S)` (pass `tile_grids` for multi-tile images), computed from the hidden states of
        the generation itself.
        """
        if history is not None or return_history:
            raise ValueError("batch_chat does not keep history (as in InternVL); use chat for multi-turn")
        if pixel_values is not None and num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if len(questions) == 1 else None
            if num_patches_list is None:
                raise ValueError("pass num_patches_list: the number of tiles of each question's image")
        prompts = []
        for i, question in enumerate(questions):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            prompt = render_conversation([(question, None)], self.system_message)
            if pixel_values is not None:
                tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.config.tokens_per_tile * num_patches_list[i]) + IMG_END_TOKEN
                prompt = prompt.replace(IMAGE_PLACEHOLDER, tokens, 1)
            prompts.append(prompt)
        responses, masks = self._chat_generate(tokenizer, prompts, pixel_values, generation_config, tile_grids, verbose)
        return (responses, masks) if return_masks else responses

    @torch.inference_mode()
    def chat(
        self,
        tokenizer,
        pixel_values,
        question: str,
        generation_config: dict,
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        IMG_START_TOKEN: str = "<img>",  # noqa: N803
        IMG_END_TOKEN: str = "</img>",  # noqa: N803
        IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>",  # noqa: N803
        verbose: bool = False,
        return_masks: bool = False,
        tile_grids: torch.Tensor | None = None,
    ):
        """InternVL's `chat`: `response = model.chat(tokenizer, pixel_values, question, generation_config)`, or
        `response, history` with `return_history=True`. `pixel_values` `(tiles, 3, S, S)` (or None for text only);
        several images in one question take `<image>` placeholders and `num_patches_list`.

        With `return_masks=True` the result gains a last element: the mask logits of the answer's `[SEG]` tokens
        on the tile canvas `(num_seg, rows * R, cols * R)` (give `tile_grids` `(1, 2)` for a multi-tile image):
        DSFF reads the states captured while generating; SELF1E runs one extra pass with its dual-perception mask
        over prompt + answer when the answer holds a `[SEG]`.
        """
        if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list sums to {sum(num_patches_list)} but pixel_values has {pixel_values.shape[0]} tiles")
        history = [] if history is None else list(history)
        prompt = render_conversation(history + [(question, None)], self.system_message)
        for n in num_patches_list:
            tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.config.tokens_per_tile * n) + IMG_END_TOKEN
            prompt = prompt.replace(IMAGE_PLACEHOLDER, tokens, 1)
        if len(num_patches_list) > 1 and return_masks:
            raise ValueError("masks need one image per conversation")
        responses, masks = self._chat_generate(tokenizer, [prompt], pixel_values, generation_config, tile_grids, verbose)
        history.append((question, responses[0]))
        out = (responses[0], history) if return_history else (responses[0],)
        if return_masks:
            out = out + (masks[0],)
        return out[0] if len(out) == 1 else out

    def _chat_generate(self, tokenizer, prompts, pixel_values, generation_config, tile_grids, verbose):
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation continues every row from its last column
        try:
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        finally:
            tokenizer.padding_side = padding_side
        config = dict(generation_config or {})
        config.setdefault("eos_token_id", self._eos_token_id(tokenizer))
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
        image_outputs = self._image_outputs(pixel_values) if pixel_values is not None else None
        sequences, states = self._generate_with_states(enc["input_ids"], enc["attention_mask"], image_outputs, config)
        new_tokens = sequences[:, enc["input_ids"].shape[1] :]
        seg_id, rej_id = self.config.seg_token_id, self.config.rej_token_id
        drop = set(tokenizer.all_special_ids) - {seg_id, rej_id}
        responses = []
        for row in new_tokens.tolist():
            row = row[: row.index(config["eos_token_id"])] if config["eos_token_id"] in row else row
            text = tokenizer.decode([t for t in row if t not in drop], skip_special_tokens=False).strip()
            responses.append(text)
            if verbose:
                print(text)
        masks = None
        if image_outputs is not None and bool((new_tokens == seg_id).any()):
            masks = self._masks_from_states(sequences, states, image_outputs, tile_grids, enc["attention_mask"],
                                            config["eos_token_id"])
        elif image_outputs is not None:
            size = self.config.image_size if self.config.mask_head == "dsff" else self.mask_decoder.output_grid
            masks = [states.new_zeros(0, size, size) for _ in prompts]
        return responses, masks

    # -- segment --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def segment(
        self,
        processor: MLLMSegProcessor,
        images,
        expressions,
        mode: str = "fast",
        tiling: str | None = None,
        threshold: float = 0.5,
        return_rle: bool = False,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        generation_config: dict | None = None,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Images in, masks at original size out.

        Args:
            processor: the model's [`MLLMSegProcessor`].
            images: one image or a list (PIL images, paths, HWC arrays).
            expressions: for one image, a string or a list of strings; for a list of images, one string or list per
                image.
            mode: `"fast"` (default): one teacher-forced forward per image over all its expressions, `[SEG]` vs
                `[REJ]` decided by the logits at each slot (the paper's evaluation protocol). `"generate"`: free
                generation; one mask per generated `[SEG]`, from the states captured while generating (DSFF) or from
                one dual-perception pass over prompt + answer, only for answers with a `[SEG]` (SELF1E).
            tiling: `"single"` (one square tile, as the released checkpoints were trained) or `"dynamic"` (InternVL
                tiling, the decoder runs per tile and tile masks are stitched); defaults to `config.seg_tiling`.
            threshold: probability threshold of the masks.
            return_rle: also return COCO RLE of each mask.
            batch_size: images per forward.

        Returns one [`SegmentationResult`] for a single image, else a list.
        """
        if mode not in SEGMENT_MODES:
            raise ValueError(f"mode must be one of {SEGMENT_MODES}, got {mode!r}")
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        if single:
            expr_lists = [[expressions] if isinstance(expressions, str) else list(expressions)]
        else:
            if isinstance(expressions, str) or len(expressions) != len(image_list):
                raise ValueError(
                    f"got {len(image_list)} images but {1 if isinstance(expressions, str) else len(expressions)} "
                    "expression lists; give one string or list of strings per image"
                )
            expr_lists = [[e] if isinstance(e, str) else list(e) for e in expressions]
        for i, exprs in enumerate(expr_lists):
            if not exprs:
                raise ValueError(f"image {i} has no expressions")
            for e in exprs:
                if not isinstance(e, str) or not e.strip().strip("."):
                    raise ValueError(f"image {i}: expression {e!r} is empty; give a non-empty description")
        image_list = [str(im) if isinstance(im, Path) else im for im in image_list]
        tiling = tiling or self.config.seg_tiling
        results = []
        for start in range(0, len(image_list), batch_size):
            chunk = slice(start, start + batch_size)
            run = self._segment_fast if mode == "fast" else self._segment_generate
            results.extend(run(processor, image_list[chunk], expr_lists[chunk], tiling, threshold, return_rle,
                               dict(generation_config or {}, max_new_tokens=max_new_tokens)))
        return results[0] if single else results

    def _segment_fast(self, processor, images, expr_lists, tiling, threshold, return_rle, _generation_config):
        prompts = [evaluation_prompt(exprs) for exprs in expr_lists]
        batch = processor(images=images, text=[q for q, _ in prompts], answers=[a for _, a in prompts], tiling=tiling)
        inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "tile_grids")}
        out = self(**inputs, pixel_values=batch["pixel_values"].to(self.device, self.dtype))
        ids = inputs["input_ids"]
        seg_b, seg_p = (ids == self.config.seg_token_id).nonzero(as_tuple=True)
        slot_logits = out.logits[seg_b, seg_p - 1].float()
        rejected_all = slot_logits.argmax(-1) == self.config.rej_token_id  # the reference's argmax rule
        two = slot_logits[:, [self.config.seg_token_id, self.config.rej_token_id]].softmax(-1)[:, 0]
        results, cursor = [], 0
        for b, exprs in enumerate(expr_lists):
            n = len(exprs)
            rejected, seg_probs = rejected_all[cursor : cursor + n].cpu(), two[cursor : cursor + n].cpu()
            cursor += n
            text = self._teacher_forced_answer(processor, ids[b], seg_p[seg_b == b], rejected)
            results.append(self._result(processor, exprs, out.pred_masks[b], batch["original_sizes"][b], rejected,
                                        seg_probs, text, threshold, return_rle))
        return results

    def _teacher_forced_answer(self, processor, ids, seg_positions, rejected) -> str:
        ids = ids.clone()
        ids[seg_positions[rejected.to(ids.device)]] = self.config.rej_token_id
        start = int((ids == self.config.image_token_id).nonzero().max()) if (ids == self.config.image_token_id).any() else 0
        text = processor.decode_answer(ids[start:].tolist())
        marker = "assistant\n"
        return text.rsplit(marker, 1)[-1].strip() if marker in text else text

    def _segment_generate(self, processor, images, expr_lists, tiling, threshold, return_rle, generation_config):
        questions = [evaluation_prompt(exprs)[0] for exprs in expr_lists]
        batch = processor(images=images, text=questions, tiling=tiling)
        tokenizer = processor.tokenizer
        input_ids, attention_mask = _left_padded(batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id)
        enc = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        config = dict(generation_config)
        config.setdefault("eos_token_id", self._eos_token_id(tokenizer))
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
        config.setdefault("do_sample", False)
        image_outputs = self._image_outputs(batch["pixel_values"])
        sequences, states = self._generate_with_states(enc["input_ids"], enc["attention_mask"], image_outputs, config)
        mask_logits = self._masks_from_states(sequences, states, image_outputs, batch["tile_grids"].to(self.device),
                                              enc["attention_mask"], config["eos_token_id"])
        new = sequences[:, enc["input_ids"].shape[1] :]
        results = []
        for b, exprs in enumerate(expr_lists):
            row = new[b].tolist()
            eos = config["eos_token_id"]
            row = row[: row.index(eos)] if eos in row else row
            slots = [t for t in row if t in (self.config.seg_token_id, self.config.rej_token_id)]
            # One mask per generated [SEG]; slots map to expressions in order (extra slots are dropped, missing
            # ones count as rejected).
            rejected = torch.ones(len(exprs), dtype=torch.bool)
            logits = mask_logits[b]
            out_logits = logits.new_zeros(len(exprs), *logits.shape[-2:])
            seg_index = 0
            for e, token in enumerate(slots[: len(exprs)]):
                if token == self.config.seg_token_id:
                    rejected[e] = False
                    out_logits[e] = logits[seg_index]
                    seg_index += 1
            seg_probs = (~rejected).float()
            results.append(self._result(processor, exprs, out_logits, batch["original_sizes"][b], rejected, seg_probs,
                                        processor.decode_answer(row), threshold, return_rle))
        return results

    @staticmethod
    def _result(processor, exprs, mask_logits, original_size, rejected, seg_probs, text, threshold, return_rle):
        probs, masks = processor.post_process_masks(mask_logits.cpu(), original_size, threshold)
        masks = masks & ~rejected[:, None, None]
        area = masks.flatten(1).sum(1)
        scores = torch.where(area > 0, (probs * masks).flatten(1).sum(1) / area.clamp(min=1), torch.zeros_like(area, dtype=probs.dtype))
        return SegmentationResult(
            expressions=list(exprs),
            masks=masks,
            boxes=processor.masks_to_boxes(masks),
            scores=scores,
            seg_probs=seg_probs,
            rejected=rejected,
            text=text,
            probabilities=probs,
            rle=processor.masks_to_rle(masks) if return_rle else None,
        )


__all__ = ["MLLMSegInferenceMixin", "SegmentationResult", "SEGMENT_MODES"]
