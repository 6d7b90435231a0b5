# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""Inference API of MLLMSeg models: InternVL-compatible `chat` / `batch_chat`, and `segment`.

Shapes use: B = conversations, L = tokens, T = LLM width, S = tile size, (h, w) = original image size.

This file travels inside checkpoints as remote code: it imports only torch, transformers and its siblings.
"""
from __future__ import annotations

import json
import operator
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch

from .configuration_mllmseg import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from .conversation_mllmseg import IMAGE_PLACEHOLDER
from .image_processing_mllmseg import MLLMSegImageProcessor
from .compat_mllmseg import cache_kwargs, output_cache
from .processing_mllmseg import MLLMSegProcessor, SegmentationResult

SEGMENT_MODES = ("fast", "per_expression", "generate")


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

    # -- shared pieces --------------------------------------------------------------------------------------------
    def _image_outputs(self, pixel_values):
        return self.get_image_features(pixel_values.to(self.device, self.dtype), return_dict=True)

    @staticmethod
    def _tiles_of(image_outputs, tiles: torch.LongTensor, samples: list[int]):
        """The image features (ViT states and projected tokens, `(N', ...)`) of the tiles of `samples`, in that order
        (a sample may repeat); `tiles` `(B,)` is the tile count of each sample of `image_outputs`."""
        starts = (torch.cumsum(tiles, 0) - tiles).tolist()
        device = image_outputs.pooler_output.device
        index = torch.tensor([starts[b] + t for b in samples for t in range(int(tiles[b]))], device=device)
        return type(image_outputs)(last_hidden_state=image_outputs.last_hidden_state[index],
                                   pooler_output=image_outputs.pooler_output[index])

    def _generate_with_states(self, input_ids, attention_mask, image_outputs, generation_config: dict,
                              record: bool = True):
        """Greedy/sampled generation that also returns the final hidden state of every position
        `(B, L_prompt + new - 1, T)`; image features are computed once, outside `generate`."""
        recorder = _FinalStateRecorder(self.model.language_model) if record else None  # no masks wanted: no states
        try:
            sequences = self.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                mm_encoder_outputs={"image": image_outputs} if image_outputs is not None else None,
                **generation_config,
            )
            states = recorder.sequence_states() if recorder is not None else None
        finally:
            if recorder is not None:
                recorder.close()
        return sequences, states

    def _masks_from_states(self, sequences, states, image_outputs, tile_grids, prompt_attention_mask=None,
                           eos_token_id=None, reordered: bool = False):
        """Mask logits per sequence from recorded states (`states[:, p]` is the state at position p).

        One full forward over prompt + answer instead where the recorded states cannot serve: SELF1E (its image
        tokens attend to the later `[SEG]` through the dual-perception mask, which generation could not know yet)
        and beam search (`reordered`: the recorded rows follow the beams of each step, not the returned
        sequences)."""
        if self.mask_decoder.dual_pass or reordered:
            return self._masks_from_full_pass(sequences, prompt_attention_mask, image_outputs, tile_grids, eos_token_id,
                                              causal=not self.mask_decoder.dual_pass)
        ids = sequences[:, : states.shape[1] + 1]
        if prompt_attention_mask is not None:
            ids = self._generated_image_tokens_as_text(ids, prompt_attention_mask.shape[1])
        hidden = torch.cat([states, states[:, -1:]], dim=1)  # pad so positions index as in a full forward
        tiles = self.tiles_per_sample(ids)
        seg_emb, seg_sample = self.seg_embeddings(ids, hidden)
        return self.predict_masks(self.mask_head_inputs(ids, hidden, image_outputs), seg_emb, seg_sample, tiles, tile_grids)

    def _generated_image_tokens_as_text(self, ids: torch.LongTensor, prompt_length: int) -> torch.LongTensor:
        """`ids` `(B, L)` with any `<IMG_CONTEXT>` the model generated (after `prompt_length`) replaced by token 0, for
        the image bookkeeping only (tile counts, image-state positions; no embedding is looked up): generation
        treated such a token as text (no image features reach it), so only the prompt's image tokens are images.
        (The full-pass path, SELF1E and beams, embeds the ids again and still refuses a generated image token.)"""
        answer = ids[:, prompt_length:]
        stray = answer == self.config.image_token_id
        if not bool(stray.any()):
            return ids
        return torch.cat([ids[:, :prompt_length], answer.masked_fill(stray, 0)], dim=1)

    def _masks_from_full_pass(self, sequences, prompt_attention_mask, image_outputs, tile_grids, eos_token_id,
                              causal: bool = False):
        """One forward over generated sequences (prompt left-padded, answer up to its end-of-turn token) with the
        image features of the generation (SELF1E's dual-perception pass, or with `causal` a plain one); positions
        count real tokens only, as in a right-padded forward."""
        mask = torch.ones_like(sequences)
        if prompt_attention_mask is not None:
            mask[:, : prompt_attention_mask.shape[1]] = prompt_attention_mask
        eos_ids = [] if eos_token_id is None else torch.as_tensor(eos_token_id, device=sequences.device).flatten()
        if len(eos_ids):
            prompt_len = 0 if prompt_attention_mask is None else prompt_attention_mask.shape[1]
            new = torch.isin(sequences[:, prompt_len:], eos_ids)
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
        image = self._tiles_of(image_outputs, tiles, rows.tolist())
        ids = sequences[rows]
        if causal:
            hidden = self.model(input_ids=ids, attention_mask=mask[rows], position_ids=position_ids[rows],
                                use_cache=False, mm_encoder_outputs={"image": image}).last_hidden_state
        else:
            hidden = self.dual_perception_states(ids, mask[rows], position_ids[rows], image)
        seg_emb, seg_sample = self.seg_embeddings(ids, hidden)
        found = self.predict_masks(self.mask_head_inputs(ids, hidden, image), seg_emb, seg_sample,
                                   self.tiles_per_sample(ids), None if tile_grids is None else tile_grids[rows])
        for i, b in enumerate(rows.tolist()):
            masks[b] = found[i]
        return masks

    @torch.inference_mode()
    def compute_sequence_masks(
        self,
        sequences: torch.LongTensor,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        tile_grids: torch.LongTensor | None = None,
        eos_token_id: int | list[int] | None = None,
        num_tiles: torch.LongTensor | None = None,
        original_sizes: torch.LongTensor | None = None,
    ) -> list[torch.Tensor]:
        """The masks of every sequence `generate` returned, as `compute_transition_scores` gives their scores:

        ```python
        out = model.generate(**inputs, num_beams=3, num_return_sequences=2, return_dict_in_generate=True)
        masks = model.compute_sequence_masks(out.sequences, **inputs)
        ```

        Args:
            sequences (`(B * E, L_prompt + new)`): `generate`'s output, E sequences per prompt, grouped by prompt (as
                transformers returns them for beams, sampling and `num_return_sequences`).
            input_ids, pixel_values, attention_mask, tile_grids: the inputs `generate` was called with (`(B, L_prompt)`
                ids, prompts left-padded; all tiles `(N, 3, S, S)`). `num_tiles` and `original_sizes` (processor
                output) are accepted and unused.
            eos_token_id (*optional*): end-of-turn id(s); tokens after the first one are padding (default: the
                model's `generation_config.eos_token_id`).

        Returns per returned sequence the mask logits of its `[SEG]` tokens (prompt and answer, in order, as
        `forward`'s `pred_masks`) on its image's tile canvas `(num_seg, rows * R, cols * R)`.

        One forward over prompt + answer of the sequences that hold a `[SEG]`, each with the tiles of its own prompt:
        the states recorded while generating cannot serve, since beams reorder the rows at every step. The ViT runs
        once per prompt image."""
        batch, prompt_len = input_ids.shape
        rows = sequences.shape[0] if sequences.dim() == 2 else 0
        if rows < batch or rows % batch or sequences.shape[1] < prompt_len:
            raise ValueError(
                f"sequences of shape {tuple(sequences.shape)} for a batch of {batch} prompts of length {prompt_len}: "
                "expected (batch * E, prompt length + new tokens), E >= 1 sequences per prompt"
            )
        if pixel_values is None:
            raise ValueError("pixel_values is None: masks need the image the sequences were generated for")
        sequences, input_ids = sequences.to(self.device), input_ids.to(self.device)
        per_prompt = sequences.shape[0] // batch
        source = torch.arange(sequences.shape[0], device=self.device) // per_prompt  # returned row -> prompt
        wrong = (sequences[:, :prompt_len] != input_ids[source]).any(1).nonzero().flatten()
        if wrong.numel():
            i = int(wrong[0])
            raise ValueError(
                f"sequence {i} does not start with the prompt of sample {i // per_prompt}; pass the inputs generate "
                f"was called with ({per_prompt} returned sequences per prompt, grouped by prompt)"
            )
        image_outputs = self._image_outputs(pixel_values)
        tiles = self.checked_tiles_per_sample(input_ids, image_outputs.pooler_output.shape[0])
        image = self._tiles_of(image_outputs, tiles, source.tolist())
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        eos = self.generation_config.eos_token_id if eos_token_id is None else eos_token_id
        grids = None if tile_grids is None else tile_grids.to(self.device)[source]
        return self._masks_from_full_pass(sequences, prompt_mask[source], image, grids, eos,
                                          causal=not self.mask_decoder.dual_pass)

    # -- InternVL-compatible chat ---------------------------------------------------------------------------------
    def text_processor(self, tokenizer_or_processor) -> MLLMSegProcessor:
        """The processor that renders `chat` prompts. `chat` takes InternVL's `tokenizer` argument or the processor
        itself; with a bare tokenizer, the prompt settings (system message, BOS) are those of the processor saved
        beside it (`processor_config.json` in the tokenizer's folder), else the defaults. Nothing is downloaded."""
        # By class name, not isinstance: transformers loads each auto class's remote-code module under its own hash,
        # so the processor `AutoProcessor` returns is a copy of this module's MLLMSegProcessor class, not the class.
        if any(cls.__name__ == MLLMSegProcessor.__name__ for cls in type(tokenizer_or_processor).__mro__):
            return tokenizer_or_processor
        tokenizer = tokenizer_or_processor
        cached = getattr(self, "_text_processor_cache", None)
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        settings = {}
        saved = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "processor_config.json"
        if saved.is_file():
            found = json.loads(saved.read_text(encoding="utf-8"))
            settings = {k: found[k] for k in ("system_message", "bos_token_in_prompt", "prompt_format") if k in found}
        image_processor = MLLMSegImageProcessor(tile_size=self.config.image_size, max_tiles=self.config.max_dynamic_tiles)
        processor = MLLMSegProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     tokens_per_tile=self.config.tokens_per_tile, **settings)
        self._text_processor_cache = (tokenizer, processor)
        return processor

    @staticmethod
    def _check_image_token_names(start, end, context):
        if (start, end, context) != (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
            raise ValueError(
                f"MLLMSeg checkpoints use the image tokens {IMG_START_TOKEN} / {IMG_END_TOKEN} / {IMG_CONTEXT_TOKEN}; got "
                f"{start} / {end} / {context}"
            )

    def _check_pixel_values(self, pixel_values) -> None:
        """`chat` / `batch_chat` tiles: None, or a floating-point tensor `(tiles, 3, S, S)` with at least one tile and
        only finite values (the image processor's normalized output)."""
        if pixel_values is None:
            return
        size = self.config.image_size
        expected = f"(tiles, 3, {size}, {size})"
        if not isinstance(pixel_values, torch.Tensor):
            kind = type(pixel_values)
            package = kind.__module__.split(".")[0]
            name = kind.__name__ if package == "builtins" else f"{package}.{kind.__name__}"
            raise TypeError(f"pixel_values must be a torch.Tensor of shape {expected}, got {name}")
        shape = tuple(pixel_values.shape)
        if pixel_values.dim() != 4:
            hint = " (one tile without its tile dimension: pass pixel_values[None])" if pixel_values.dim() == 3 else ""
            raise ValueError(f"pixel_values must have shape {expected}, got {shape}{hint}")
        if shape[0] == 0:
            raise ValueError("pixel_values has 0 tiles; pass at least one tile, or pixel_values=None for text only")
        if shape[1] != 3:
            raise ValueError(f"pixel_values must have 3 channels (RGB), got {shape[1]} (shape {shape})")
        if shape[2:] != (size, size):
            raise ValueError(
                f"pixel_values tiles must be {size}x{size} (the model's image_size), got {shape[2]}x{shape[3]}; tile "
                "images with the checkpoint's image processor"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be floating point (normalized tiles, as the image processor returns them), got "
                f"{pixel_values.dtype}"
            )
        bad = int((~torch.isfinite(pixel_values)).sum())
        if bad:
            raise ValueError(f"pixel_values holds {bad} NaN or infinite value{'s' if bad > 1 else ''}")

    @staticmethod
    def _check_num_patches(num_patches_list, n_tiles: int, n_images: int, images_are: str) -> list[int]:
        """`num_patches_list` as ints: one positive tile count per image (`n_images` of them, `images_are` says what
        they are), summing to the `n_tiles` of `pixel_values`. A 1-D integer tensor (the image processor's
        `num_tiles`) is taken as that list."""
        if isinstance(num_patches_list, torch.Tensor) and num_patches_list.dim() == 1 and not (
                num_patches_list.is_floating_point() or num_patches_list.is_complex()):
            num_patches_list = num_patches_list.tolist()
        if not isinstance(num_patches_list, (list, tuple)):
            raise TypeError(
                f"num_patches_list must be a list of tile counts, one per image, got {type(num_patches_list).__name__}"
            )
        counts = []
        for i, n in enumerate(num_patches_list):
            try:
                value = None if isinstance(n, bool) else operator.index(n)
            except TypeError:
                value = None
            if value is None or value < 1:
                raise ValueError(
                    f"num_patches_list[{i}] must be a positive integer (the tiles of image {i}), got {n!r}"
                )
            counts.append(value)
        if len(counts) != n_images:
            raise ValueError(f"num_patches_list has {len(counts)} entries for {n_images} {images_are}")
        if sum(counts) != n_tiles:
            raise ValueError(f"num_patches_list sums to {sum(counts)} but pixel_values has {n_tiles} tiles")
        return counts

    @staticmethod
    def _check_history(history) -> list[tuple[str, str]]:
        if history is None:
            return []
        if not isinstance(history, (list, tuple)):
            raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
        for i, turn in enumerate(history):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise ValueError(f"history[{i}] must be a (question, answer) pair of strings, got {turn!r}")
        return [tuple(turn) for turn in history]

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
        IMG_START_TOKEN: str = IMG_START_TOKEN,  # noqa: N803 (InternVL's argument names)
        IMG_END_TOKEN: str = IMG_END_TOKEN,  # noqa: N803
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,  # noqa: N803
        verbose: bool = False,
        return_masks: bool = False,
        tile_grids: torch.Tensor | None = None,
    ):
        """InternVL's `batch_chat`: one question per image (its tiles `num_patches_list[i]`), one answer each.
        `tokenizer` may be the processor (see [`text_processor`]).

        With `return_masks=True` also returns, per answer, the mask logits of its `[SEG]` tokens on the tile canvas
        `(num_seg, rows * S, cols * S)` (pass `tile_grids` for multi-tile images), computed from the hidden states of
        the generation itself. Masks are computed only when asked for.
        """
        self._check_image_token_names(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if history is not None or return_history:
            raise ValueError("batch_chat does not keep history (as in InternVL); use chat for multi-turn")
        if not isinstance(questions, (list, tuple)):
            raise TypeError(f"questions must be a list of strings, one per image, got {type(questions).__name__}")
        if not questions:
            raise ValueError("questions is empty; give one question per image")
        for i, question in enumerate(questions):
            if not isinstance(question, str):
                raise TypeError(f"questions[{i}] must be a string, got {type(question).__name__}")
        self._check_pixel_values(pixel_values)
        if pixel_values is None and num_patches_list is not None:
            raise ValueError("num_patches_list is given but pixel_values is None; pass the tiles, or neither")
        if pixel_values is not None and num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if len(questions) == 1 else None
            if num_patches_list is None:
                raise ValueError("pass num_patches_list: the number of tiles of each question's image")
        processor = self.text_processor(tokenizer)
        tiles = None
        if pixel_values is not None:
            counts = self._check_num_patches(num_patches_list, pixel_values.shape[0], len(questions), "questions")
            tiles = [[n] for n in counts]
        batch = processor(text=list(questions), num_tiles=tiles, padding_side="left")
        responses, masks = self._chat_generate(processor, batch, pixel_values, generation_config, tile_grids,
                                               verbose, return_masks)
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
        IMG_START_TOKEN: str = IMG_START_TOKEN,  # noqa: N803
        IMG_END_TOKEN: str = IMG_END_TOKEN,  # noqa: N803
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,  # noqa: N803
        verbose: bool = False,
        return_masks: bool = False,
        tile_grids: torch.Tensor | None = None,
    ):
        """InternVL's `chat`: `response = model.chat(tokenizer, pixel_values, question, generation_config)`, or
        `response, history` with `return_history=True`. `pixel_values` `(tiles, 3, S, S)` (or None for text only);
        several images in one question take `<image>` placeholders and `num_patches_list`. `tokenizer` may be the
        processor (see [`text_processor`]): the prompt has the checkpoint's system message and, for InternLM2
        backbones, the BOS, and the question is escaped (control tokens typed in it are plain text).

        With `return_masks=True` the result gains a last element: the mask logits of the answer's `[SEG]` tokens
        on the tile canvas `(num_seg, rows * R, cols * R)` (give `tile_grids` `(1, 2)` for a multi-tile image):
        DSFF reads the states captured while generating; SELF1E runs one extra pass with its dual-perception mask
        over prompt + answer when the answer holds a `[SEG]`. Masks are computed only when asked for.
        """
        self._check_image_token_names(IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        history = self._check_history(history)
        self._check_pixel_values(pixel_values)
        if pixel_values is None:
            if num_patches_list is not None and len(num_patches_list):
                raise ValueError("num_patches_list is given but pixel_values is None; pass the tiles, or neither")
            num_patches_list = []
        else:
            # One image per <image> placeholder of the conversation; none written: one image, put first (as InternVL).
            placeholders = question.count(IMAGE_PLACEHOLDER) + sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history)
            num_patches_list = self._check_num_patches(
                [pixel_values.shape[0]] if num_patches_list is None else num_patches_list, pixel_values.shape[0],
                max(placeholders, 1), f"images ({IMAGE_PLACEHOLDER} placeholders in the question and history, or one)",
            )
        if len(num_patches_list) > 1 and return_masks:
            raise ValueError("masks need one image per conversation")
        if not history and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question  # as InternVL: the image goes into the first turn
        processor = self.text_processor(tokenizer)
        tiles = [list(num_patches_list)] if pixel_values is not None else None
        batch = processor(text=[question], history=[history], num_tiles=tiles, padding_side="left")
        responses, masks = self._chat_generate(processor, batch, pixel_values, generation_config, tile_grids,
                                               verbose, return_masks)
        history.append((question, responses[0]))
        out = (responses[0], history) if return_history else (responses[0],)
        if return_masks:
            out = out + (masks[0],)
        return out[0] if len(out) == 1 else out

    def _generation_settings(self, processor, generation_config: dict | None) -> dict:
        if generation_config is not None and not isinstance(generation_config, Mapping):
            raise TypeError(
                "generation_config must be a dict of generate() keywords (e.g. dict(max_new_tokens=64)), got "
                f"{type(generation_config).__name__}"
            )
        config = dict(generation_config or {})
        if int(config.get("num_return_sequences", 1)) != 1:
            raise ValueError(
                f"num_return_sequences={config['num_return_sequences']}: chat and segment return one answer per "
                "question; call model.generate(...) for several"
            )
        config.setdefault("eos_token_id", processor.end_of_turn_id)
        config.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
        return config

    def _chat_generate(self, processor, batch, pixel_values, generation_config, tile_grids, verbose, return_masks):
        config = self._generation_settings(processor, generation_config)
        ids, attention = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        image_outputs = self._image_outputs(pixel_values) if pixel_values is not None else None
        want_masks = return_masks and image_outputs is not None
        sequences, states = self._generate_with_states(ids, attention, image_outputs, config, record=want_masks)
        new_tokens = sequences[:, ids.shape[1] :]
        responses = [processor.decode_answer(row) for row in new_tokens.tolist()]
        if verbose:
            for text in responses:
                print(text)
        masks = None
        if want_masks:
            if bool((new_tokens == self.config.seg_token_id).any()):
                masks = self._masks_from_states(sequences, states, image_outputs, tile_grids, attention,
                                                config["eos_token_id"], reordered=int(config.get("num_beams", 1)) > 1)
            else:
                size = self.mask_decoder.output_grid
                masks = [states.new_zeros(0, size, size) for _ in responses]
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
                `[REJ]` decided by the logits at each slot (the paper's evaluation protocol). `"per_expression"`:
                each expression in its own one-expression conversation, the results of separate `segment` calls
                with one expression each (the same masks, `[REJ]` decisions and slot probabilities), computed
                with the ViT once per image and, for the DSFF decoder, the LLM once over the system turn, once over
                each image's prefix (its image tokens) and once over the expressions' suffixes, each pass on the KV
                cache of the one before (exact: the same tokens at the same positions); SELF1E's image
                tokens read the `[SEG]` (dual perception), so there the conversations run as one batch, the ViT
                still once per image. `text` is then the per-expression answers, one per line. `"generate"`: free
                generation; one mask per generated `[SEG]`, from the states captured while generating (DSFF) or from
                one dual-perception pass over prompt + answer, only for answers with a `[SEG]` (SELF1E); a warning
                names the images whose answer holds more or fewer `[SEG]`/`[REJ]` slots than expressions.
            tiling: `"single"` (one square tile, as the released checkpoints were trained) or `"dynamic"` (InternVL
                tiling, the decoder runs per tile and tile masks are stitched); defaults to `config.seg_tiling`.
            threshold: probability threshold of the masks.
            return_rle: also return COCO RLE of each mask.
            batch_size: images per forward (`per_expression`: images per ViT batch; their expressions share it).

        Returns one [`SegmentationResult`] for a single image, else a list.
        """
        if mode not in SEGMENT_MODES:
            raise ValueError(f"mode must be one of {SEGMENT_MODES}, got {mode!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, got {threshold!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
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
            for j, e in enumerate(exprs):
                if not isinstance(e, str):
                    raise TypeError(f"image {i}, expression {j}: expected a string, got {type(e).__name__} ({e!r})")
                if not e.strip().strip("."):
                    raise ValueError(f"image {i}: expression {e!r} is empty; give a non-empty description")
        image_list = [str(im) if isinstance(im, Path) else im for im in image_list]
        tiling = tiling or self.config.seg_tiling
        results, mismatches = [], []
        for start in range(0, len(image_list), batch_size):
            chunk = slice(start, start + batch_size)
            if mode == "fast":
                results.extend(self._segment_fast(processor, image_list[chunk], expr_lists[chunk], tiling, threshold,
                                                  return_rle))
            elif mode == "per_expression":
                results.extend(self._segment_per_expression(processor, image_list[chunk], expr_lists[chunk], tiling,
                                                            threshold, return_rle))
            else:
                found, lines = self._segment_generate(processor, image_list[chunk], expr_lists[chunk], tiling,
                                                      threshold, return_rle,
                                                      dict(generation_config or {}, max_new_tokens=max_new_tokens),
                                                      first=start)
                results.extend(found)
                mismatches.extend(lines)
        if mismatches:  # one warning per call, naming every image concerned (issue 20)
            warnings.warn(
                "segment(mode='generate'): the model answered with a different number of [SEG]/[REJ] slots than "
                "expressions (slots map to expressions in order): " + "; ".join(mismatches),
                UserWarning, stacklevel=2,
            )
        return results[0] if single else results

    def _segment_fast(self, processor, images, expr_lists, tiling, threshold, return_rle):
        prompts = [processor.segmentation_prompt(exprs) for exprs in expr_lists]
        batch = processor(images=images, text=[q for q, _ in prompts], answers=[a for _, a in prompts], tiling=tiling)
        inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "tile_grids")}
        # Only the logits that predict each slot are read (`seg_logits`): the last position's logits, not every one's
        # (issue 21: the full [B, L, vocab] tensor was ~1 GB at 1B with batch 8).
        out = self(**inputs, pixel_values=batch["pixel_values"].to(self.device, self.dtype), logits_to_keep=1)
        return processor.post_process_segmentation(
            out, target_sizes=batch["original_sizes"], expressions=expr_lists, input_ids=inputs["input_ids"],
            threshold=threshold, return_rle=return_rle,
        )

    def _segment_per_expression(self, processor, images, expr_lists, tiling, threshold, return_rle):
        """`segment(mode="per_expression")` on one batch of images: K = sum of E_b one-expression conversations."""
        pixels = processor.image_processor(list(images), tiling=tiling, return_tensors="pt")
        tiles = pixels["num_tiles"].to(self.device)
        owner = [b for b, exprs in enumerate(expr_lists) for _ in exprs]  # conversation -> image
        prompts = [processor.segmentation_prompt([e]) for exprs in expr_lists for e in exprs]
        batch = processor(text=[q for q, _ in prompts], answers=[a for _, a in prompts],
                          num_tiles=[[int(tiles[b])] for b in owner])
        ids, attention = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        image_outputs = self._image_outputs(pixels["pixel_values"])
        grids = pixels["tile_grids"].to(self.device)
        if self.mask_decoder.dual_pass:
            masks, slot_logits = self._per_expression_batched(ids, attention, image_outputs, tiles, grids, owner)
        else:
            masks, slot_logits = self._per_expression_shared_prefix(ids, attention, image_outputs, tiles, grids, owner)
        outputs = SimpleNamespace(pred_masks=masks, seg_logits=slot_logits, seg_sample=torch.tensor(owner))
        results = processor.post_process_segmentation(outputs, target_sizes=pixels["original_sizes"],
                                                      expressions=expr_lists, threshold=threshold,
                                                      return_rle=return_rle)
        for b, result in enumerate(results):
            rows = [r for r, o in enumerate(owner) if o == b]
            result.text = "\n".join(processor.teacher_forced_answer(ids[r], result.rejected[k : k + 1])
                                     for k, r in enumerate(rows))
        return results

    def shared_prefix_length(self, ids: torch.LongTensor, attention: torch.Tensor) -> int:
        """The prefix that the conversations `ids` `(n, L)` (right-padded, `attention` `(n, L)`) of one image share and
        that their LLM pass can compute once: the longest common run of real tokens, ending before the position
        that predicts the first `[SEG]` (whose state and logits are per conversation). It must hold every image
        token."""
        same = (ids == ids[:1]).all(0) & attention.bool().all(0)
        common = int(same.long().cumprod(0).sum())
        seg_pos = (ids == self.config.seg_token_id).long().argmax(1)
        image_end = int((ids[0] == self.config.image_token_id).nonzero().max()) + 1
        length = min(common, int(seg_pos.min()) - 1)
        if length < image_end:
            raise ValueError(
                f"the one-expression conversations of an image share {length} tokens but their image tokens end at "
                f"{image_end}; per_expression needs the image before the question"
            )
        return length

    def _prefix_pass(self, input_ids, start: int = 0, cache=None, attention_mask=None, image=None):
        """One causal LLM pass over `input_ids` `(n, l)` at positions `start .. start + l - 1`, on `cache` (the keys and
        values of the first `start` positions, one row per input row; None when `start` is 0). `attention_mask`
        `(n, start + l)` (None: every token real); `image`: features of the image tokens in `input_ids`.
        Returns (final states `(n, l, T)`, the cache grown by these positions)."""
        n, length = input_ids.shape
        positions = torch.arange(start, start + length, device=input_ids.device).expand(n, -1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                         mm_encoder_outputs=None if image is None else {"image": image}, **cache_kwargs(cache))
        return out.last_hidden_state, output_cache(out)

    def _per_expression_shared_prefix(self, ids, attention, image_outputs, tiles, tile_grids, owner):
        """Causal mask heads (DSFF), a prefix tree over transformers' KV cache (`batch_select_indices` copies rows):

        1. the system turn (the tokens before the first `<img>`, the same in every conversation, `(1, S)`) once per
           group of images whose prefixes have one length (one tile count);
        2. on it, expanded to the group's G images, the rest of each image's prefix (image tokens and whatever its
           conversations share, `(G, P - S)`): the image states and the fused tiles come from this pass;
        3. on that, expanded to the group's n conversations, their suffixes `(n, L - P)` in one right-padded batch:
           the `[SEG]` state and slot logits of each conversation, one mask each.

        Returns per image the mask logits `(E_b, rows * S, cols * S)` and the slot logits `(K, vocab)` in conversation
        order. Exact: a conversation's states are those of its own causal forward (same tokens, positions, keys)."""
        owner_t = torch.tensor(owner, device=ids.device)
        lengths = {b: self.shared_prefix_length(ids[owner_t == b], attention[owner_t == b]) for b in set(owner)}
        image_end = {b: int((ids[owner.index(b)] == self.config.image_token_id).nonzero().max()) for b in lengths}
        system = int((ids[0] == self.config.image_token_id).nonzero().min()) - 1  # <img> starts the image prefix
        masks = [None] * len(lengths)
        slot_logits = [None] * len(owner)
        for end in sorted(set(image_end.values())):
            group = [b for b in sorted(lengths) if image_end[b] == end]
            prefix = min(lengths[b] for b in group)
            rows = [r for r, o in enumerate(owner) if o in group]
            local = torch.tensor([group.index(owner[r]) for r in rows], device=ids.device)
            head_ids = ids[[owner.index(b) for b in group], :prefix]  # (G, P)
            cache = self._prefix_pass(head_ids[:1, :system])[1] if system > 0 else None
            if cache is not None:
                cache.batch_select_indices(torch.zeros(len(group), dtype=torch.long, device=ids.device))
            image = self._tiles_of(image_outputs, tiles, group)
            head, cache = self._prefix_pass(head_ids[:, system:], system, cache, image=image)
            cache.batch_select_indices(local)  # (G, P) keys and values -> one copy per conversation (n, P)
            length = int(attention[rows].sum(1).max())
            tail_ids = ids[rows, prefix:length]
            tail, _ = self._prefix_pass(tail_ids, prefix, cache, attention_mask=attention[rows, :length])
            seg_sample, seg_pos = self.slot_rows(tail_ids)  # positions in the suffix
            if seg_sample.tolist() != list(range(len(rows))):
                raise ValueError("per_expression needs exactly one [SEG] per conversation")
            seg_emb = tail[seg_sample, seg_pos]
            for r, logits in zip(rows, self.lm_head(seg_emb)):
                slot_logits[r] = logits
            found = self.predict_masks(self.mask_head_inputs(head_ids[:, system:], head, image), seg_emb, local,
                                       tiles[group], tile_grids[group])
            for b, m in zip(group, found):
                masks[b] = m
        return masks, torch.stack(slot_logits)

    def _per_expression_batched(self, ids, attention, image_outputs, tiles, tile_grids, owner):
        """Mask heads that need a second pass with each conversation's own `[SEG]` (SELF1E: its image tokens attend to
        it): the K conversations as one fast-mode batch, each with its image's features (the ViT ran once per image).
        Returns per image the mask logits `(E_b, ...)` and the slot logits `(K, vocab)`."""
        out = self(input_ids=ids, attention_mask=attention, mm_encoder_outputs={"image": self._tiles_of(image_outputs, tiles, owner)},
                   tile_grids=tile_grids[owner], logits_to_keep=1)
        if out.seg_sample.tolist() != list(range(len(owner))):
            raise ValueError("per_expression needs exactly one [SEG] per conversation")
        masks = [torch.cat([out.pred_masks[r] for r, o in enumerate(owner) if o == b]) for b in range(max(owner) + 1)]
        return masks, out.seg_logits

    def _segment_generate(self, processor, images, expr_lists, tiling, threshold, return_rle, generation_config,
                          first: int = 0):
        """Results of one batch in `generate` mode, and a line per image whose answer holds more or fewer slots
        than expressions (`first`: the index of the batch's first image in the `segment` call)."""
        questions = [processor.segmentation_prompt(exprs)[0] for exprs in expr_lists]
        batch = processor(images=images, text=questions, tiling=tiling, padding_side="left")
        ids, attention = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        config = self._generation_settings(processor, generation_config)
        config.setdefault("do_sample", False)
        image_outputs = self._image_outputs(batch["pixel_values"])
        sequences, states = self._generate_with_states(ids, attention, image_outputs, config)
        mask_logits = self._masks_from_states(sequences, states, image_outputs, batch["tile_grids"].to(self.device),
                                              attention, config["eos_token_id"],
                                              reordered=int(config.get("num_beams", 1)) > 1)
        answers = sequences[:, ids.shape[1] :]
        results = processor.post_process_generation(
            answers, mask_logits, target_sizes=batch["original_sizes"], expressions=expr_lists,
            threshold=threshold, return_rle=return_rle,
        )
        return results, processor.slot_count_mismatches(answers, expr_lists, first=first)


__all__ = ["MLLMSegInferenceMixin", "SegmentationResult", "SEGMENT_MODES"]
