# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""MLLMSeg processor: image tiling + tokenizer with the InternVL2.5 chat format and MLLMSeg's special tokens.

Shapes use: N = images, M = masks, S = tile size, (h, w) = an original image size.

This file travels inside checkpoints as remote code: it imports only torch, numpy, transformers and its siblings
in this folder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_mllmseg import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, REJ_TOKEN, SEG_TOKEN
from .conversation_mllmseg import IMAGE_PLACEHOLDER, INTERNVL_SYSTEM_MESSAGE, render_conversation

IGNORE_INDEX = -100


class MLLMSegProcessor(ProcessorMixin):
    r"""
    Wraps an [`MLLMSegImageProcessor`] (InternVL tiling, no torchvision) and a tokenizer holding the image tokens,
    `[SEG]` and `[REJ]`.

    Text uses `<image>` placeholders; each one is expanded to `<img>` + `<IMG_CONTEXT>` x `tokens_per_tile` per tile
    + `</img>`. [`render`] builds the InternVL2.5 chat format around questions and answers.

    Args:
        image_processor: the image processor.
        tokenizer: the tokenizer.
        tokens_per_tile (`int`, defaults to 256): `<IMG_CONTEXT>` tokens per tile (the model's `tokens_per_tile`).
        system_message (`str`, *optional*): the system turn; defaults to InternVL2.5's (the released weights saw it).
            Pass "" for none.
        bos_token_in_prompt (`bool`, defaults to False): start prompts with the BOS token (InternLM2 backbones).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        tokens_per_tile: int = 256,
        system_message: str | None = None,
        bos_token_in_prompt: bool = False,
        chat_template=None,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.tokens_per_tile = tokens_per_tile
        self.system_message = INTERNVL_SYSTEM_MESSAGE if system_message is None else system_message
        self.bos_token_in_prompt = bos_token_in_prompt
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, SEG_TOKEN, REJ_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks MLLMSeg's tokens {missing}; add them (mllmseg.base_checkpoint)")
        self.seg_token_id = vocab[SEG_TOKEN]
        self.rej_token_id = vocab[REJ_TOKEN]

    # -- text -----------------------------------------------------------------------------------------------------
    def expand_image_placeholders(self, text: str, num_tiles: list[int]) -> str:
        """Replace the i-th `<image>` by `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * num_tiles[i]) + `</img>`."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(num_tiles):
            raise ValueError(f"the text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(num_tiles)} images")
        out = [pieces[0]]
        for n, piece in zip(num_tiles, pieces[1:]):
            out.append(IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.tokens_per_tile * int(n)) + IMG_END_TOKEN + piece)
        return "".join(out)

    def render(self, question: str, answer: str | None = None, history: list[tuple[str, str]] | None = None,
               system_message: str | None = None) -> str:
        """InternVL2.5 chat text for one conversation (`answer=None` leaves it open for generation)."""
        bos = (self.tokenizer.bos_token or "") if self.bos_token_in_prompt else ""
        system = self.system_message if system_message is None else system_message
        return render_conversation(list(history or []) + [(question, answer)], system, bos=bos)

    # -- main call ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        answers: str | list[str] | None = None,
        tiling: str | None = None,
        max_tiles: int | None = None,
        system_message: str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tile the images and tokenize one conversation per image.

        Args:
            images: one image or a list (PIL, array, tensor or path), one per text; or None for text only.
            text: the user question(s), with an `<image>` placeholder (added in front when missing).
            answers (*optional*): assistant answers; then the conversations are closed and `labels` cover only the
                answers (and their closing `<|im_end|>` + newline), -100 elsewhere.
            tiling: `"single"` or `"dynamic"` (defaults to the image processor's).
            max_length (*optional*): refuse longer sequences with a clear error rather than truncating them.

        Returns a `BatchFeature` with `input_ids` `(N, L)`, `attention_mask` `(N, L)`, `labels` (with answers),
        `pixel_values` `(tiles, 3, S, S)`, `num_tiles` `(N,)`, `tile_grids` `(N, 2)` and `original_sizes` `(N, 2)`.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        answer_list = [answers] if isinstance(answers, str) else (list(answers) if answers is not None else None)
        image_features = {}
        if images is not None:
            image_list = images if isinstance(images, (list, tuple)) else [images]
            if len(image_list) != len(texts):
                raise ValueError(f"got {len(image_list)} images for {len(texts)} texts; give one text per image")
            proc_kwargs = {"return_tensors": "pt"}
            if tiling is not None:
                proc_kwargs["tiling"] = tiling
            if max_tiles is not None:
                proc_kwargs["max_tiles"] = max_tiles
            image_features = dict(self.image_processor(list(image_list), **proc_kwargs))
        if answer_list is not None and len(answer_list) != len(texts):
            raise ValueError(f"got {len(answer_list)} answers for {len(texts)} texts")

        prompts, fulls = [], []
        for i, question in enumerate(texts):
            if images is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            if images is not None:
                question = self.expand_image_placeholders(question, [int(image_features["num_tiles"][i])])
            prompts.append(self.render(question, None, system_message=system_message))
            if answer_list is not None:
                fulls.append(self.render(question, answer_list[i], system_message=system_message))

        encoded = self._tokenize(fulls if answer_list is not None else prompts, max_length)
        if answer_list is not None:
            # Loss on the answer and its closing "<|im_end|>" + newline, the way InternVL2.5 preprocessing labels a turn.
            labels = encoded["input_ids"].clone()
            for i, prompt in enumerate(prompts):
                n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                labels[i, :n_prompt] = IGNORE_INDEX
            labels[encoded["attention_mask"] == 0] = IGNORE_INDEX
            encoded["labels"] = labels
        return BatchFeature({**encoded, **image_features})

    def _tokenize(self, texts: list[str], max_length: int | None) -> dict:
        encoded = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        limit = max_length or getattr(self.tokenizer, "model_max_length", None)
        if limit and limit < 10**9:
            lengths = encoded["attention_mask"].sum(1)
            if int(lengths.max()) > limit:
                i = int(lengths.argmax())
                raise ValueError(
                    f"conversation {i} is {int(lengths[i])} tokens long, over the limit of {limit} "
                    "(shorten the expressions or use fewer tiles)"
                )
        return dict(encoded)

    # -- outputs --------------------------------------------------------------------------------------------------
    def decode_answer(self, token_ids) -> str:
        """Decode generated ids, keeping `[SEG]` / `[REJ]` but dropping the other special tokens."""
        keep = {self.seg_token_id, self.rej_token_id}
        drop = set(self.tokenizer.all_special_ids) - keep
        ids = [int(t) for t in token_ids if int(t) not in drop]
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()

    @staticmethod
    def post_process_masks(mask_logits: torch.Tensor, original_size, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits on the tile canvas `(M, H_c, W_c)` -> (probabilities `(M, h, w)`, bool masks `(M, h, w)`).

        As the reference: sigmoid, bilinear resize to the original size (align_corners=False), probability >=
        threshold. The canvas covers the whole image in both tiling modes, so one resize maps it back.
        """
        h, w = int(original_size[0]), int(original_size[1])
        if mask_logits.shape[0] == 0:
            empty = torch.zeros(0, h, w)
            return empty, empty.bool()
        probs = F.interpolate(mask_logits.float().sigmoid()[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return probs, probs >= threshold

    @staticmethod
    def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
        """`(M, h, w)` bool -> `(M, 4)` float xyxy boxes, inclusive pixel indices; empty masks give [0, 0, 0, 0]."""
        if masks.shape[0] == 0:
            return torch.zeros(0, 4)
        rows, cols = masks.any(dim=2), masks.any(dim=1)
        h, w = masks.shape[-2:]
        ar_h, ar_w = torch.arange(h), torch.arange(w)
        y0 = torch.where(rows, ar_h, h).min(1).values
        y1 = torch.where(rows, ar_h, -1).max(1).values
        x0 = torch.where(cols, ar_w, w).min(1).values
        x1 = torch.where(cols, ar_w, -1).max(1).values
        boxes = torch.stack([x0, y0, x1, y1], 1).float()
        boxes[~rows.any(1)] = 0
        return boxes

    @staticmethod
    def masks_to_rle(masks: torch.Tensor) -> list[dict]:
        """COCO compressed RLE per mask (`counts` as str), through pycocotools."""
        import numpy as np
        from pycocotools import mask as mask_utils  # optional dependency, only needed for RLE output

        rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        return list(rles)


__all__ = ["MLLMSegProcessor", "IGNORE_INDEX"]
