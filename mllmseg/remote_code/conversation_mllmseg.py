# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""Chat format and segmentation prompts of MLLMSeg (InternVL2.5 `internvl2_5` template, reference prompt lists).

This file travels inside checkpoints as remote code: standard library only.
"""
from __future__ import annotations

import random
import re

IMAGE_PLACEHOLDER = "<image>"

# InternVL2.5's default system message; the released MLLMSeg checkpoints were trained with it.
INTERNVL_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# Training prompts of the reference (several expressions of one image per sample).
QUESTION_TEMPLATES = (
    IMAGE_PLACEHOLDER + "\nCan you segment {class_name} in this image?",
    IMAGE_PLACEHOLDER + "\nPlease segment {class_name} in this image.",
    IMAGE_PLACEHOLDER + "\nWhat are {class_name} in this image? Please respond with segmentation masks.",
    IMAGE_PLACEHOLDER + "\nWhat are {class_name} in this image? Please output segmentation masks.",
)
# (start, item, end) triples; the item's [SEG] becomes [REJ] where the expression has no target.
ANSWER_TEMPLATES = (
    ("The segmentation results are", "{class_name} [SEG]", "."),
    ("Sure, they are", "{class_name}:[SEG]", "."),
    ("Sure,", "the mask of {class_name} is [SEG]", "."),
    ("Sure,", "the segmentation of {class_name} is [SEG]", "."),
    ("Sure,", "the referred {class_name} is [SEG]", "."),
)
MAX_EXPRESSIONS_PER_SAMPLE = 5

# User text (questions, expressions) is wrapped in these two control characters while a prompt is built, so the
# processor can tokenize it as plain text: no user string may become a special token (`[SEG]`, `<|im_end|>`, ...).
# They never reach the tokenizer and are removed from user text first (Unicode private-use characters: not
# whitespace, so `str.strip` leaves them alone).
USER_OPEN, USER_CLOSE = "\ue000", "\ue001"


def mark_user_text(text: str, keep_image_placeholders: bool = False) -> str:
    """Wrap user text for escaping. With `keep_image_placeholders`, `<image>` stays a placeholder (chat questions
    place images with it); otherwise it is literal text too (expressions)."""
    text = text.replace(USER_OPEN, "").replace(USER_CLOSE, "")
    if keep_image_placeholders:
        return IMAGE_PLACEHOLDER.join(USER_OPEN + piece + USER_CLOSE if piece else "" for piece in text.split(IMAGE_PLACEHOLDER))
    return USER_OPEN + text + USER_CLOSE


class MarkedText(str):
    """A question or answer whose user parts are already marked for escaping (what `segmentation_prompt` and the
    training dataset build). Any other string handed to the processor as a question is user text as a whole: a
    string cannot claim to be marked by containing the marks, only by being built as this type."""


def is_marked(text: str) -> bool:
    return isinstance(text, MarkedText)


_MARKED = re.compile(re.escape(USER_OPEN) + "(.*?)" + re.escape(USER_CLOSE), re.DOTALL)


def unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the marks: (plain text, `[start, end)` character spans of the user text in it)."""
    out, spans, cursor, length = [], [], 0, 0
    for match in _MARKED.finditer(text):
        before = text[cursor : match.start()]
        out += [before, match.group(1)]
        length += len(before)
        if match.group(1):
            spans.append((length, length + len(match.group(1))))
        length += len(match.group(1))
        cursor = match.end()
    out.append(text[cursor:])
    return "".join(out), spans


def placeholders_outside_user_text(text: str) -> int:
    """Number of `<image>` placeholders that are not inside marked user text."""
    return _MARKED.sub("", text).count(IMAGE_PLACEHOLDER)


def expand_image_placeholders(text: str, replacements: list[str]) -> str:
    """Replace the `<image>` placeholders outside marked user text, in order, by `replacements`."""
    found = placeholders_outside_user_text(text)
    if found != len(replacements):
        raise ValueError(f"the text has {found} {IMAGE_PLACEHOLDER} placeholders for {len(replacements)} images")
    todo = iter(replacements)
    out, cursor = [], 0
    for match in list(_MARKED.finditer(text)) + [None]:
        end = len(text) if match is None else match.start()
        pieces = text[cursor:end].split(IMAGE_PLACEHOLDER)
        out.append("".join(piece + (next(todo) if k < len(pieces) - 1 else "") for k, piece in enumerate(pieces)))
        if match is not None:
            out.append(match.group(0))
            cursor = match.end()
    return "".join(out)


def render_conversation(
    turns: list[tuple[str, str | None]], system_message: str | None = INTERNVL_SYSTEM_MESSAGE, bos: str = ""
) -> str:
    """InternVL2.5 chat text. `turns` are (user, assistant) pairs; an assistant of None leaves the prompt open
    for generation (`<|im_start|>assistant\\n`). InternLM2 tokenizers want `bos="<s>"`; Qwen2 ones none."""
    parts = [bos]
    if system_message:
        parts.append(f"<|im_start|>system\n{system_message}<|im_end|>\n")
    for user, assistant in turns:
        parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        if assistant is not None:
            parts.append(f"{assistant}<|im_end|>\n")
    return "".join(parts)


def clean_expression(text: str) -> str:
    """Expressions as the reference feeds them: stripped of surrounding blanks and dots (inside the marks of marked
    user text)."""
    if text.startswith(USER_OPEN) and text.endswith(USER_CLOSE):
        return USER_OPEN + clean_expression(text[1:-1]) + USER_CLOSE
    return text.strip().strip(".")


def evaluation_prompt(expressions: list[str], no_target: list[bool] | None = None) -> tuple[str, str]:
    """The reference evaluation prompt: all expressions of an image in one conversation, a `[SEG]` per slot
    (`[REJ]` in the slots whose `no_target` is true, for training on it).

    The question keeps the reference's missing space before "in this image" (the released weights saw it).
    """
    exprs = [clean_expression(e) for e in expressions]
    no_target = [False] * len(exprs) if no_target is None else list(no_target)
    if len(no_target) != len(exprs):
        raise ValueError(f"{len(exprs)} expressions but {len(no_target)} no_target flags")
    question = IMAGE_PLACEHOLDER + "\n What are " + ", ".join(exprs) + "in this image? Please output segmentation masks."
    answer = "Sure," + ", ".join(f"{e}:{'[REJ]' if empty else '[SEG]'}" for e, empty in zip(exprs, no_target)) + "."
    return question, answer


def training_prompt(expressions: list[str], no_target: list[bool], rng: random.Random) -> tuple[str, str]:
    """A reference training conversation: a random question template over the (lower-cased) expressions and a
    random answer template, `[REJ]` in place of `[SEG]` for expressions without target."""
    if len(expressions) != len(no_target):
        raise ValueError(f"{len(expressions)} expressions but {len(no_target)} no_target flags")
    exprs = [clean_expression(e) for e in expressions]
    question = rng.choice(QUESTION_TEMPLATES).format(class_name=", ".join(exprs).lower())
    start, item, end = rng.choice(ANSWER_TEMPLATES)
    # The slot token goes into the template before the expression does: an expression's own text is never rewritten.
    items = [item.replace("[SEG]", "[REJ]" if empty else "[SEG]").format(class_name=e) for e, empty in zip(exprs, no_target)]
    return question, start + " " + ", ".join(items) + end


__all__ = [
    "IMAGE_PLACEHOLDER",
    "INTERNVL_SYSTEM_MESSAGE",
    "QUESTION_TEMPLATES",
    "ANSWER_TEMPLATES",
    "render_conversation",
    "mark_user_text",
    "MarkedText",
    "unmark",
    "expand_image_placeholders",
    "placeholders_outside_user_text",
    "evaluation_prompt",
    "training_prompt",
]
