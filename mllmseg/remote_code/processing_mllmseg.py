# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""MLLMSeg processor: image tiling + tokenizer with the InternVL2.5 chat format and MLLMSeg's special tokens.

Shapes use: N = images, M = masks, S = tile size, (h, w) = an original image size.

This file travels inside checkpoints as remote code: it imports only torch, numpy, transformers and its siblings
in this folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin
from transformers.utils import ModelOutput

from .configuration_mllmseg import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, token_id_fields
from .conversation_mllmseg import (
    IMAGE_PLACEHOLDER,
    INTERNVL_SYSTEM_MESSAGE,
    evaluation_prompt,
    expand_image_placeholders,
    MarkedText,
    is_marked,
    mark_user_text,
    placeholders_outside_user_text,
    render_conversation,
    unmark,
)

IGNORE_INDEX = -100


@dataclass
class SegmentationResult(ModelOutput):
    """What `segment` / `post_process_segmentation` return for one image. Dict-like as transformers' outputs are
    (`result["masks"]`, `result.keys()`, `result.to_tuple()`); `to_records()` gives one plain, JSON-ready dict per
    expression.

    Attributes:
        expressions: the expressions, in order.
        masks: `(E, h, w)` bool, at the original image size (all False where rejected).
        boxes: `(E, 4)` float xyxy, inclusive pixel indices; a row of NaN for an empty mask (it has no box: `[0, 0,
            0, 0]` would be the box of the single pixel (0, 0)).
        scores: `(E,)` mask confidence: mean probability over the mask's pixels (0 for an empty mask).
        seg_probs: `(E,)` probability of `[SEG]` against `[REJ]` at the expression's slot.
        rejected: `(E,)` bool, the model answered `[REJ]` (no such object).
        text: the answer text (teacher-forced in `fast` mode, generated in `generate` mode).
        probabilities: `(E, h, w)` mask probabilities.
        rle: COCO RLE per mask, when asked for.
    """

    expressions: list[str] | None = None
    masks: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    seg_probs: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    text: str | None = None
    probabilities: torch.Tensor | None = None
    rle: list[dict] | None = None

    def to_records(self, include_masks: bool = False) -> list[dict]:
        """One dict of plain Python values per expression: `expression`, `rejected`, `box` (xyxy, inclusive pixel
        indices, `None` for an empty or rejected mask), `score`, `seg_prob`, `area` (mask pixels), `rle` when the
        result carries RLE, and `mask` (nested lists of bool) with `include_masks`."""
        records = []
        for k, expression in enumerate(self.expressions):
            area = int(self.masks[k].sum())
            record = {
                "expression": expression,
                "rejected": bool(self.rejected[k]),
                "box": None if area == 0 else [int(v) for v in self.boxes[k].tolist()],
                "score": round(float(self.scores[k]), 4),
                "seg_prob": round(float(self.seg_probs[k]), 4),
                "area": area,
            }
            if self.rle is not None:
                record["rle"] = self.rle[k]
            if include_masks:
                record["mask"] = self.masks[k].tolist()
            records.append(record)
        return records


END_OF_TURN = "<|im_end|>"
# Version of the prompt settings a processor saves; checkpoints saved without it predate the BOS rule below.
PROMPT_FORMAT = 2


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before a text by default (InternLM2: `<s>`; Qwen2: no BOS). The reference
    tokenizes its chat prompts that way (and prefixes the BOS in training), so a prompt starts with a BOS exactly
    for these tokenizers."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _shown(value, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string_list(value, name: str, single: bool = True) -> list[str]:
    """`value` as a list of strings (a lone string is a list of one when `single`), or a TypeError naming the
    argument, the index and the value (bytes and None included, which would otherwise fail deep inside)."""
    if single and isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        kind = "a string or a list of strings" if single else "a list of strings"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} ({_shown(value)})")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(item).__name__} ({_shown(item)})")
    return list(value)


def _check_history(history, count: int) -> None:
    """`history`: per text, None or a list of (question, answer) pairs of strings."""
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list (one entry per text) of lists of (question, answer) pairs, got "
                        f"{type(history).__name__} ({_shown(history)})")
    if len(history) != count:
        raise ValueError(f"got {len(history)} histories for {count} texts")
    for i, turns in enumerate(history):
        if turns is None:
            continue
        if not isinstance(turns, (list, tuple)):
            raise TypeError(f"history[{i}] must be a list of (question, answer) pairs, got {type(turns).__name__} "
                            f"({_shown(turns)})")
        for j, turn in enumerate(turns):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise TypeError(f"history[{i}][{j}] must be a (question, answer) pair of strings, got {_shown(turn)}")


def _check_num_tiles(num_tiles, count: int) -> None:
    """`num_tiles`: per text, a list of positive tile counts (one per `<image>` placeholder)."""
    if not isinstance(num_tiles, (list, tuple)) or len(num_tiles) != count:
        raise ValueError(f"num_tiles must be a list of {count} lists (one per text) of tile counts, got "
                         f"{_shown(num_tiles)}")
    for i, tiles in enumerate(num_tiles):
        valid = isinstance(tiles, (list, tuple)) and all(
            not isinstance(n, bool) and isinstance(n, (int, torch.Tensor)) and int(n) >= 1 for n in tiles)
        if not valid:
            raise ValueError(f"num_tiles[{i}] must be a list of positive integers, got {_shown(tiles)}")


class MLLMSegProcessor(ProcessorMixin):
    r"""
    Wraps an [`MLLMSegImageProcessor`] (InternVL tiling, no torchvision) and a tokenizer holding the image tokens,
    `[SEG]` and `[REJ]`. It owns all text: the InternVL2.5 chat format, the system message, the BOS, `<image>`
    expansion, padding, escaping of user text, and decoding.

    Text uses `<image>` placeholders; each one is expanded to `<img>` + `<IMG_CONTEXT>` x `tokens_per_tile` per tile
    + `</img>`. **User text is escaped**: a question, a history question or an expression is tokenized as plain
    text, so `[SEG]`, `<|im_end|>` or `<IMG_CONTEXT>` typed by a user are ordinary characters, never control tokens
    (prompts without such text tokenize exactly as the reference's). Answers are trusted (their `[SEG]` / `[REJ]`
    are the targets), except expressions marked inside them by [`segmentation_prompt`] / `training_prompt`.

    Args:
        image_processor: the image processor.
        tokenizer: the tokenizer.
        tokens_per_tile (`int`, defaults to 256): `<IMG_CONTEXT>` tokens per tile (the model's `tokens_per_tile`).
        system_message (`str`, *optional*): the system turn; defaults to InternVL2.5's (the released weights saw it).
            Pass "" for none. Saved with the processor: `chat`, `segment`, training and evaluation all use it.
        bos_token_in_prompt (`bool`, *optional*): start prompts with the BOS token; default: exactly when the
            tokenizer adds one by default (InternLM2 backbones yes, Qwen2 no), as the reference tokenizes.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        tokens_per_tile: int = 256,
        system_message: str | None = None,
        bos_token_in_prompt: bool | None = None,
        chat_template=None,
        prompt_format: int | None = None,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.tokens_per_tile = tokens_per_tile
        self.system_message = INTERNVL_SYSTEM_MESSAGE if system_message is None else system_message
        self.bos_token_in_prompt = tokenizer_adds_bos(tokenizer) if bos_token_in_prompt is None else bool(bos_token_in_prompt)
        self.prompt_format = PROMPT_FORMAT
        ids = token_id_fields(tokenizer)
        self.seg_token_id, self.rej_token_id = ids["seg_token_id"], ids["rej_token_id"]
        vocab = tokenizer.get_vocab()
        self.end_of_turn_id = vocab.get(END_OF_TURN, tokenizer.eos_token_id)
        # Every added token (special or not): user text must never produce one.
        self._control_ids = frozenset(int(i) for i in tokenizer.added_tokens_decoder)
        self._control_text = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
        self._control_strings = tuple(self._control_text.values())
        first = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
        self._prefixes_space = bool(first) and str(tokenizer.convert_ids_to_tokens(first[0])).startswith("\u2581")

    # Everything `__call__` returns that the model takes (or post-processing needs).
    model_input_names = ["input_ids", "attention_mask", "pixel_values", "num_tiles", "tile_grids", "original_sizes"]
    # Image-processor keywords `__call__` routes to the image processor (also inside `images_kwargs=`).
    IMAGE_KWARGS = ("tiling", "min_tiles", "max_tiles", "use_thumbnail", "do_resize", "do_rescale", "do_normalize",
                    "image_mean", "image_std", "resample", "rescale_factor", "do_convert_rgb")

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        """Loading a saved processor. A `processor_config.json` without `prompt_format` was written before the BOS
        rule, when every save said `bos_token_in_prompt: false` (InternLM2 backbones included, where the reference
        prompts start with `<s>`): such a file's BOS setting is ignored and the tokenizer's family decides."""
        if "prompt_format" not in processor_dict:
            processor_dict = {k: v for k, v in processor_dict.items() if k != "bos_token_in_prompt"}
        return super().from_args_and_dict(args, processor_dict, **kwargs)

    @classmethod
    def for_model_config(cls, tokenizer, config, system_message: str | None = None,
                         bos_token_in_prompt: bool | None = None) -> "MLLMSegProcessor":
        """The processor matching a model config: tile size, tiling mode, tile budget and image tokens per tile
        from the config (any backbone); text settings as in [`MLLMSegProcessor`]."""
        from .image_processing_mllmseg import MLLMSegImageProcessor

        image_processor = MLLMSegImageProcessor(
            tile_size=config.image_size, tiling=config.seg_tiling, max_tiles=config.max_dynamic_tiles
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer, tokens_per_tile=config.tokens_per_tile,
                   system_message=system_message, bos_token_in_prompt=bos_token_in_prompt)

    # -- text -----------------------------------------------------------------------------------------------------
    def image_tokens(self, num_tiles: int) -> str:
        return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (self.tokens_per_tile * int(num_tiles)) + IMG_END_TOKEN

    def expand_image_placeholders(self, text: str, num_tiles: list[int]) -> str:
        """Replace the i-th `<image>` (outside escaped user text) by `<img>` + `<IMG_CONTEXT>` x
        (tokens_per_tile * num_tiles[i]) + `</img>`."""
        return expand_image_placeholders(text, [self.image_tokens(n) for n in num_tiles])

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image of the given (height, width) sizes, for serving integrations:
        `<img>` + `<IMG_CONTEXT>` x tokens_per_tile per tile + `</img>`, tiles as the image processor cuts them
        (image-processor keywords such as `tiling` / `max_tiles` apply)."""
        data = {}
        if image_sizes is not None:
            image_kwargs = {k: v for k, v in kwargs.items() if k in self.IMAGE_KWARGS}
            patches = [self.image_processor.get_number_of_image_patches(int(h), int(w), image_kwargs)
                       for h, w in image_sizes]
            data = {"num_image_tokens": [2 + self.tokens_per_tile * n for n in patches], "num_image_patches": patches}
        return MultiModalData(**data)

    @staticmethod
    def segmentation_prompt(expressions: list[str], no_target: list[bool] | None = None) -> tuple[str, str]:
        """The reference evaluation conversation (question, answer) over `expressions`, each escaped as user text;
        `[REJ]` in the slots of `no_target` expressions."""
        expressions = _string_list(expressions, "expressions", single=False)  # a lone string would be one per char
        for i, expression in enumerate(expressions):
            if not expression.strip().strip("."):
                raise ValueError(f"expressions[{i}] is empty ({expression!r}); give a non-empty description")
        question, answer = evaluation_prompt([mark_user_text(e) for e in expressions], no_target)
        return MarkedText(question), MarkedText(answer)

    def _marked_conversation(self, question: str, answer: str | None, history, system_message: str | None) -> str:
        """The conversation with user text marked for escaping (questions unless already marked)."""
        def user(q):
            return q if is_marked(q) else mark_user_text(q, keep_image_placeholders=True)

        turns = [(user(q), a) for q, a in (history or [])] + [(user(question), answer)]
        system = self.system_message if system_message is None else system_message
        return render_conversation(turns, system)

    def render(self, question: str, answer: str | None = None, history: list[tuple[str, str]] | None = None,
               system_message: str | None = None) -> str:
        """InternVL2.5 chat text for one conversation (`answer=None` leaves it open for generation), BOS included
        where the tokenizer family has one. For display and tests: tokenizing it again does not escape user text;
        the processor's own calls do."""
        bos = (self.tokenizer.bos_token or "") if self.bos_token_in_prompt else ""
        return bos + unmark(self._marked_conversation(question, answer, history, system_message))[0]

    def encode_text(self, marked: str) -> list[int]:
        """Token ids of a prompt whose user text is marked: BOS where the family has one, the rest as the tokenizer
        splits it, except that no control token comes out of user text (those spans are tokenized as plain text)."""
        text, spans = unmark(marked)
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast and bool(spans))
        ids = list(enc["input_ids"])
        if spans:
            if fast:
                ids = self._escape_user_spans(text, ids, enc["offset_mapping"], spans)
            elif any(t in text[a:b] for a, b in spans for t in self._control_strings):
                raise ValueError(
                    f"user text {text[spans[0][0]:spans[0][1]]!r} contains a special token's text, which only a fast "
                    "tokenizer can keep as plain text; use a fast tokenizer"
                )
        if self.bos_token_in_prompt and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def _escape_user_spans(self, text, ids, offsets, spans) -> list[int]:
        out = []
        for token, (start, end) in zip(ids, offsets):
            # An added token matched in the text (not, say, `<unk>` standing for an unknown character).
            matched = token in self._control_ids and self._control_text[token] in text[start:end]
            if matched and any(start < b and a < end for a, b in spans):
                out.extend(self._plain_ids(text[start:end]))
            else:
                out.append(token)
        return out

    def _plain_ids(self, piece: str) -> list[int]:
        """Ids of `piece` as plain text (no added token matched in it), as it would tokenize inside a text."""
        if self._prefixes_space:
            # Sentencepiece-style tokenizers (InternLM2) put a space before a text of their own; the piece sits inside
            # a text, so tokenize it after a newline and keep only its own tokens.
            enc = self.tokenizer("\n" + piece, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=True)
            ids = [i for i, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end > 1]
        else:
            ids = self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if any(i in self._control_ids and self._control_text[i] in piece for i in ids):
            # a non-special added token (split_special_tokens leaves those): tokenize character by character
            ids = [i for ch in piece for i in self.tokenizer(ch, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
        return ids

    def pad(self, sequences: list[list[int]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """`input_ids` / `attention_mask` `(N, L)`, padded on `padding_side` ("left" for generation) with the
        tokenizer's pad token; the tokenizer itself is not touched."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_of_turn_id
        width = max((len(s) for s in sequences), default=0)
        ids = torch.full((len(sequences), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            ids[i, cols] = torch.tensor(seq, dtype=torch.long)
            mask[i, cols] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _check_length(self, sequences: list[list[int]], max_length: int | None) -> None:
        limit = max_length or getattr(self.tokenizer, "model_max_length", None)
        if limit and limit < 10**9:
            for i, seq in enumerate(sequences):
                if len(seq) > limit:
                    raise ValueError(
                        f"conversation {i} is {len(seq)} tokens long, over the limit of {limit} "
                        "(shorten the expressions or use fewer tiles)"
                    )

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
        padding_side: str = "right",
        history: list[list[tuple[str, str]]] | None = None,
        num_tiles: list[list[int]] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool | None = None,
        images_kwargs: dict | None = None,
        text_kwargs: dict | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tile the images and tokenize one conversation per text.

        Args:
            images: one image or a list (PIL, array, tensor or path), one per text; or None for text only.
            text: the user question(s), with an `<image>` placeholder (added in front when missing). Escaped: control
                tokens typed in a question are plain text.
            answers (*optional*): assistant answers; then the conversations are closed and `labels` cover only the
                answers (and their closing `<|im_end|>` + newline), -100 elsewhere.
            tiling: `"single"` or `"dynamic"` (defaults to the image processor's).
            max_length (*optional*): refuse longer sequences with a clear error rather than truncating them.
            padding_side: `"right"` (training, fast mode) or `"left"` (generation).
            history (*optional*): per text, earlier (question, answer) turns, rendered before it (chat).
            num_tiles (*optional*): per text, the tile count of each of its `<image>` placeholders, for callers that
                tile themselves (InternVL's `chat(pixel_values=...)`); with `images` it comes from the tiling.

        Keywords as transformers processors take them: `return_tensors` (`"pt"`, the default, or `"np"`),
        `padding` (`True` / `"longest"`; `False` for one text), `truncation` (refused: cutting a conversation would cut
        image tokens or the answer; `max_length` refuses long ones instead), image-processor keywords (`min_tiles`,
        `use_thumbnail`, `do_normalize`, ... directly or in `images_kwargs=`), `text_kwargs=` (`max_length`,
        `padding_side`). Any other keyword is an error naming it.

        Returns a `BatchFeature` with `input_ids` `(N, L)`, `attention_mask` `(N, L)`, `labels` (with answers),
        and with images `pixel_values` `(tiles, 3, S, S)`, `num_tiles` `(N,)`, `tile_grids` `(N, 2)` and
        `original_sizes` `(N, 2)`.
        """
        image_kwargs = dict(images_kwargs or {})
        image_kwargs.update({k: kwargs.pop(k) for k in list(kwargs) if k in self.IMAGE_KWARGS})
        for key, value in dict(text_kwargs or {}).items():
            if key == "max_length":
                max_length = value
            elif key == "padding_side":
                padding_side = value
            elif key == "padding":
                padding = value
            else:
                raise TypeError(f"MLLMSegProcessor: unknown text keyword {key!r} (text_kwargs takes max_length, padding, "
                                "padding_side)")
        if kwargs:
            raise TypeError(f"MLLMSegProcessor: unknown keyword(s) {sorted(kwargs)}; image-processor keywords are "
                            f"{list(self.IMAGE_KWARGS)}")
        if truncation:
            raise ValueError("truncation is not supported: it would cut image tokens or the answer; pass max_length to "
                             "refuse long conversations instead")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if padding not in (True, False, "longest"):
            raise ValueError(f"padding must be True, False or 'longest', got {padding!r} (fixed-length padding would add "
                             "nothing the model uses)")
        if images is None and text is None:
            raise ValueError("pass text (the questions) and/or images; got neither")
        if images is not None and text is None:
            text = [""] * (len(images) if isinstance(images, (list, tuple)) else 1)
        texts = _string_list(text, "text")
        answer_list = None if answers is None else _string_list(answers, "answers")
        image_features = {}
        if images is not None:
            image_list = images if isinstance(images, (list, tuple)) else [images]
            if len(image_list) != len(texts):
                raise ValueError(f"got {len(image_list)} images for {len(texts)} texts; give one text per image")
            proc_kwargs = {**image_kwargs, "return_tensors": "pt"}
            if tiling is not None:
                proc_kwargs["tiling"] = tiling
            if max_tiles is not None:
                proc_kwargs["max_tiles"] = max_tiles
            image_features = dict(self.image_processor(list(image_list), **proc_kwargs))
            num_tiles = [[int(n)] for n in image_features["num_tiles"]]
        if answer_list is not None and len(answer_list) != len(texts):
            raise ValueError(f"got {len(answer_list)} answers for {len(texts)} texts")
        if history is not None:
            _check_history(history, len(texts))
        if num_tiles is not None and not image_features:
            _check_num_tiles(num_tiles, len(texts))

        prompts, fulls = [], []
        for i, question in enumerate(texts):
            tiles = list(num_tiles[i]) if num_tiles is not None else []
            marked_q = question if is_marked(question) else mark_user_text(question, keep_image_placeholders=True)
            turns = history[i] if history is not None else None
            if tiles and placeholders_outside_user_text(marked_q) + sum(
                placeholders_outside_user_text(q if is_marked(q) else mark_user_text(q, True)) for q, _ in (turns or [])
            ) == 0:
                marked_q = IMAGE_PLACEHOLDER + "\n" + marked_q
            marked_q = MarkedText(marked_q)
            prompt = self.expand_image_placeholders(self._marked_conversation(marked_q, None, turns, system_message), tiles)
            prompts.append(self.encode_text(prompt))
            if answer_list is not None:
                full = self._marked_conversation(marked_q, answer_list[i], turns, system_message)
                fulls.append(self.encode_text(self.expand_image_placeholders(full, tiles)))

        sequences = fulls if answer_list is not None else prompts
        self._check_length(sequences, max_length)
        if padding is False and len({len(seq) for seq in sequences}) > 1:
            raise ValueError("padding=False needs conversations of one length; these differ (use padding=True)")
        encoded = self.pad(sequences, padding_side)
        if answer_list is not None:
            # Loss on the answer and its closing "<|im_end|>" + newline, the way InternVL2.5 preprocessing labels a turn.
            labels = encoded["input_ids"].clone()
            for i, (prompt, full) in enumerate(zip(prompts, fulls)):
                offset = labels.shape[1] - len(full) if padding_side == "left" else 0
                labels[i, : offset + len(prompt)] = IGNORE_INDEX
            labels[encoded["attention_mask"] == 0] = IGNORE_INDEX
            encoded["labels"] = labels
        return BatchFeature({**encoded, **image_features}, tensor_type="np" if return_tensors == "np" else None)

    # -- chat messages --------------------------------------------------------------------------------------------
    _CALL_KEYWORDS = ("tiling", "max_tiles", "max_length", "padding", "padding_side", "truncation", "images_kwargs",
                      "text_kwargs")

    @staticmethod
    def _message_parts(message: dict, where: str) -> tuple[str, list]:
        """(text with one `<image>` per image item, [image items]) of one transformers-style chat message."""
        content = message.get("content")
        if isinstance(content, str):
            return content, []
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"{where}: content must be a string or a list of {{'type': ...}} items, got "
                            f"{type(content).__name__}")
        texts, images = [], []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                texts.append(str(item.get("text", "")))
            elif kind == "image":
                image = next((item[k] for k in ("image", "url", "path") if item.get(k) is not None), None)
                if image is None:
                    raise ValueError(f"{where}: content[{j}] is an image item without 'image', 'url' or 'path'")
                images.append(image)
                texts.append(IMAGE_PLACEHOLDER + "\n")
            else:
                raise ValueError(f"{where}: content[{j}] has type {kind!r}; this model takes 'text' and 'image' items")
        return "".join(texts), images

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tokenize: bool = False, return_dict: bool = False,
                            return_tensors="pt", processor_kwargs: dict | None = None, **kwargs):
        """transformers-style chat messages -> the InternVL2.5 conversation, rendered by this processor (not by a
        Jinja template: user text is escaped and `<image>` expanded exactly as `__call__` does).

        Args:
            conversation: a list of `{"role": "system" | "user" | "assistant", "content": str | [items]}` messages
                (items `{"type": "text", "text": ...}` or `{"type": "image", "image" | "url" | "path": ...}`), or a
                list of such conversations. At most one image per conversation.
            add_generation_prompt: leave the conversation open for the assistant (the default; a closed conversation
                needs a final assistant message).
            continue_final_message: the final assistant message is a prefix for generation to continue.
            tokenize / return_dict: as transformers' `apply_chat_template`: the text by default; token ids; or, with
                both, the processor's `BatchFeature` (`input_ids`, `attention_mask`, `pixel_values`, `num_tiles`,
                `tile_grids`, `original_sizes`), which `generate` and `pipeline("image-text-to-text")` take.
            processor_kwargs: passed to `__call__`, as are the keywords it takes (`tiling`, `max_tiles`,
                `padding_side`, image-processor keywords, ...); other keywords are template variables in transformers'
                API and mean nothing here.
        """
        if chat_template is not None:
            raise ValueError("MLLMSegProcessor renders the InternVL2.5 chat format itself; chat_template is not used")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts, images, histories, systems, prefixes = [], [], [], [], []
        for c, messages in enumerate(conversations):
            system, turns, conv_images, question = None, [], [], None
            for m, message in enumerate(messages):
                where = f"conversation[{c}][{m}]" if batched else f"conversation[{m}]"
                if not isinstance(message, dict):
                    raise TypeError(f"{where}: expected a message dict with 'role' and 'content', got "
                                    f"{type(message).__name__}")
                text, found = self._message_parts(message, where)
                conv_images += found
                role = message.get("role")
                if role == "system":
                    system = text
                elif role == "user":
                    if question is not None:
                        raise ValueError(f"{where}: two user messages in a row; give each its assistant answer")
                    question = text
                elif role == "assistant":
                    if question is None:
                        raise ValueError(f"{where}: an assistant message must follow a user message")
                    turns.append((question, text))
                    question = None
                else:
                    raise ValueError(f"{where}: role must be 'system', 'user' or 'assistant', got {role!r}")
            prefix = None
            if continue_final_message:
                if question is not None or not turns:
                    raise ValueError("continue_final_message needs a conversation that ends with an assistant message")
                question, prefix = turns.pop()
            elif question is None:
                raise ValueError("the conversation ends with an assistant message: add a user message to answer, or "
                                 "pass continue_final_message=True to continue the last answer")
            if len(conv_images) > 1:
                raise ValueError(f"conversation {c} has {len(conv_images)} images; this processor takes one image per "
                                 "conversation")
            texts.append(question)
            images.append(conv_images[0] if conv_images else None)
            histories.append(turns)
            systems.append(system)
            prefixes.append(prefix)
        if len({s for s in systems}) > 1:
            raise ValueError("the conversations of a batch have different system messages; process them one by one")
        if not tokenize:
            rendered = [self.render(q, None, h, systems[0]) + (p or "") for q, h, p in zip(texts, histories, prefixes)]
            return rendered if batched else rendered[0]
        if any(p for p in prefixes):
            raise ValueError("continue_final_message with tokenize=True is not supported; render the text and append "
                             "the prefix's token ids")
        if any(i is None for i in images) and not all(i is None for i in images):
            raise ValueError("either every conversation of a batch has an image or none has")
        # Other keywords are template variables in transformers' API (pipelines pass generation settings there too);
        # with no template they mean nothing, except those `__call__` takes.
        call_kwargs = {k: v for k, v in kwargs.items() if k in self._CALL_KEYWORDS or k in self.IMAGE_KWARGS}
        call_kwargs.update(processor_kwargs or {})
        features = self(images=None if images[0] is None else images, text=texts, history=histories,
                        system_message=systems[0], padding_side=call_kwargs.pop("padding_side", "left"),
                        return_tensors="pt" if return_tensors in (None, "auto") else return_tensors, **call_kwargs)
        if return_dict:
            return features
        ids = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
        return ids if batched else ids[0]

    # -- outputs --------------------------------------------------------------------------------------------------
    def trim_answer(self, token_ids) -> list[int]:
        """Generated ids up to (not including) the first end-of-turn token."""
        ids = [int(t) for t in token_ids]
        return ids[: ids.index(self.end_of_turn_id)] if self.end_of_turn_id in ids else ids

    def decode_answer(self, token_ids) -> str:
        """Decode generated ids up to the end of the turn, keeping `[SEG]` / `[REJ]` but dropping the other
        special and added tokens (padding, image tokens)."""
        keep = {self.seg_token_id, self.rej_token_id}
        drop = (set(self.tokenizer.all_special_ids) | self._control_ids) - keep
        ids = [t for t in self.trim_answer(token_ids) if t not in drop]
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()

    def post_process_segmentation(
        self, outputs, target_sizes, expressions: list[list[str]], input_ids: torch.Tensor | None = None,
        threshold: float = 0.5, return_rle: bool = False,
    ) -> list[SegmentationResult]:
        """Teacher-forced (`fast` mode) model outputs -> one [`SegmentationResult`] per sample.

        Args:
            outputs: the model's output for a batch built from [`segmentation_prompt`] conversations: `pred_masks`
                (per sample `(E_b, H_c, W_c)` logits on the tile canvas), `seg_logits` `(M, vocab)` (the logits that
                predict each `[SEG]` slot, in order) and `seg_sample` `(M,)`.
            target_sizes: `(B, 2)` original (height, width) per sample.
            expressions: per sample its expressions (one slot each).
            input_ids (*optional*): the batch's ids, for the answer text (with `[REJ]` in the rejected slots).

        `[SEG]` against `[REJ]` at each slot is the reference's argmax rule over the whole vocabulary.
        """
        rejected_all, seg_probs_all = (t.cpu() for t in self.slot_decisions(outputs.seg_logits))
        sample_of_slot = outputs.seg_sample.cpu()
        results = []
        for b, exprs in enumerate(expressions):
            rows = (sample_of_slot == b).nonzero().flatten()
            if len(rows) != len(exprs):
                raise ValueError(f"sample {b}: {len(rows)} [SEG] slots for {len(exprs)} expressions")
            rejected, seg_probs = rejected_all[rows], seg_probs_all[rows]
            text = "" if input_ids is None else self.teacher_forced_answer(input_ids[b], rejected)
            results.append(self._result(exprs, outputs.pred_masks[b], target_sizes[b], rejected, seg_probs, text,
                                        threshold, return_rle))
        return results

    def post_process_generation(
        self, answer_ids: torch.Tensor, mask_logits: list[torch.Tensor], target_sizes, expressions: list[list[str]],
        threshold: float = 0.5, return_rle: bool = False,
    ) -> list[SegmentationResult]:
        """Generated answers (`(B, T)` new tokens) and the mask logits of their `[SEG]` tokens -> one
        [`SegmentationResult`] per sample. Slots map to expressions in order: one mask per generated `[SEG]`, a
        `[REJ]` or a missing slot counts as rejected, slots beyond the expressions are dropped."""
        results = []
        for b, exprs in enumerate(expressions):
            row = self.trim_answer(answer_ids[b].tolist())
            out_logits, rejected = self.generated_slot_masks(row, mask_logits[b].cpu(), len(exprs))
            results.append(self._result(exprs, out_logits, target_sizes[b], rejected, (~rejected).float(),
                                        self.decode_answer(row), threshold, return_rle))
        return results

    def slot_decisions(self, slot_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced slot logits `(M, vocab)` (the logits that predict each `[SEG]` slot) -> (`rejected` `(M,)`
        bool, `seg_probs` `(M,)` P([SEG]) of the [SEG] / [REJ] pair), on their device. `[REJ]` wins a slot by the
        reference's argmax rule over the whole vocabulary."""
        slot_logits = slot_logits.float()
        rejected = slot_logits.argmax(-1) == self.rej_token_id
        seg_probs = slot_logits[:, [self.seg_token_id, self.rej_token_id]].softmax(-1)[:, 0]
        return rejected, seg_probs

    def generated_slot_masks(self, answer_ids: list[int], mask_logits: torch.Tensor, num_expressions: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One generated answer (ids up to its end of turn) and the mask logits of its `[SEG]`s `(S, H, W)` ->
        (`(num_expressions, H, W)` logits per expression, `rejected` `(num_expressions,)`), on the logits' device.
        Slots map to expressions in order: one mask per `[SEG]`; a `[REJ]` or a missing slot is rejected (zero
        logits); slots beyond the expressions are dropped."""
        slots = self.answer_slots(answer_ids)[:num_expressions]
        is_seg = [e for e, token in enumerate(slots) if token == self.seg_token_id]
        out_logits = mask_logits.new_zeros(num_expressions, *mask_logits.shape[-2:])
        rejected = torch.ones(num_expressions, dtype=torch.bool, device=mask_logits.device)
        if is_seg:
            out_logits[is_seg] = mask_logits[: len(is_seg)]
            rejected[is_seg] = False
        return out_logits, rejected

    def answer_slots(self, answer_ids) -> list[int]:
        """The `[SEG]` / `[REJ]` tokens of an answer (ids up to its end of turn), in order: one slot per expression."""
        return [int(t) for t in answer_ids if int(t) in (self.seg_token_id, self.rej_token_id)]

    def slot_count_mismatches(self, answer_ids: torch.Tensor, expressions: list[list[str]], first: int = 0) -> list[str]:
        """One line per sample whose generated answer (`(B, T)` new tokens) holds more or fewer `[SEG]` / `[REJ]` slots
        than it has expressions: what [`post_process_generation`] does with it (extra slots dropped, missing ones
        counted as rejected). `first`: the index of sample 0 in the caller's numbering."""
        lines = []
        for b, exprs in enumerate(expressions):
            slots = self.answer_slots(self.trim_answer(answer_ids[b].tolist()))
            if len(slots) == len(exprs):
                continue
            segs = sum(t == self.seg_token_id for t in slots)
            what = f"{len(slots)} slots ({segs} [SEG], {len(slots) - segs} [REJ]) for {len(exprs)} expressions"
            if len(slots) > len(exprs):
                extra = slots[len(exprs) :]
                lost = sum(t == self.seg_token_id for t in extra)
                lines.append(f"image {first + b}: {what}; the last {len(extra)} dropped ({lost} [SEG] masks lost)")
            else:
                lines.append(f"image {first + b}: {what}; the missing {len(exprs) - len(slots)} counted as rejected")
        return lines

    def teacher_forced_answer(self, ids: torch.Tensor, rejected: torch.Tensor) -> str:
        """The answer of a teacher-forced conversation (after its last `<|im_start|>assistant`), with `[REJ]` in its
        rejected slots."""
        ids = ids.clone()
        seg_positions = (ids == self.seg_token_id).nonzero().flatten()
        ids[seg_positions[rejected.to(ids.device)]] = self.rej_token_id
        turns = (ids == self.tokenizer.convert_tokens_to_ids("<|im_start|>")).nonzero().flatten()
        text = self.decode_answer(ids[int(turns.max()) + 1 if len(turns) else 0 :].tolist())
        return text.split("\n", 1)[1].strip() if text.startswith("assistant\n") else text

    def _result(self, exprs, mask_logits, original_size, rejected, seg_probs, text, threshold, return_rle):
        probs, masks = self.post_process_masks(mask_logits.cpu(), original_size, threshold)
        masks = masks & ~rejected[:, None, None]
        area = masks.flatten(1).sum(1)
        scores = torch.where(area > 0, (probs * masks).flatten(1).sum(1) / area.clamp(min=1),
                             torch.zeros_like(area, dtype=probs.dtype))
        return SegmentationResult(
            expressions=list(exprs),
            masks=masks,
            boxes=self.masks_to_boxes(masks),
            scores=scores,
            seg_probs=seg_probs,
            rejected=rejected,
            text=text,
            probabilities=probs,
            rle=self.masks_to_rle(masks) if return_rle else None,
        )

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
        """`(M, h, w)` bool -> `(M, 4)` float xyxy boxes, inclusive pixel indices; an empty mask gives a row of NaN
        (no box; torchvision's `masks_to_boxes` gives [0, 0, 0, 0], the box of pixel (0, 0))."""
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
        boxes[~rows.any(1)] = float("nan")
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


__all__ = ["MLLMSegProcessor", "SegmentationResult", "IGNORE_INDEX", "tokenizer_adds_bos"]
