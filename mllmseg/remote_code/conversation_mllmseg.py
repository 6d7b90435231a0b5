# Copyright 2026 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""Chat format and segmentation prompts of MLLMSeg (InternVL2.5 `internvl2_5` template, reference prompt lists).

This file travels inside checkpoints as remote code: standard library only.
"""
from __future__ import annotations

import random

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
    """Expressions as the reference feeds them: stripped of surrounding blanks and dots."""
    return text.strip().strip(".")


def evaluation_prompt(expressions: list[str]) -> tuple[str, str]:
    """The reference evaluation prompt: all expressions of an image in one conversation, a `[SEG]` per slot.

    The question keeps the reference's missing space before "in this image" (the released weights saw it).
    """
    exprs = [clean_expression(e) for e in expressions]
    question = IMAGE_PLACEHOLDER + "\n What are " + ", ".join(exprs) + "in this image? Please output segmentation masks."
    answer = "Sure," + ", ".join(f"{e}:[SEG]" for e in exprs) + "."
    return question, answer


def training_prompt(expressions: list[str], no_target: list[bool], rng: random.Random) -> tuple[str, str]:
    """A reference training conversation: a random question template over the (lower-cased) expressions and a
    random answer template, `[REJ]` in place of `[SEG]` for expressions without target."""
    if len(expressions) != len(no_target):
        raise ValueError(f"{len(expressions)} expressions but {len(no_target)} no_target flags")
    exprs = [clean_expression(e) for e in expressions]
    question = rng.choice(QUESTION_TEMPLATES).format(class_name=", ".join(exprs).lower())
    start, item, end = rng.choice(ANSWER_TEMPLATES)
    items = [item.format(class_name=e).replace("[SEG]", "[REJ]" if empty else "[SEG]") for e, empty in zip(exprs, no_target)]
    return question, start + " " + ", ".join(items) + end


__all__ = [
    "IMAGE_PLACEHOLDER",
    "INTERNVL_SYSTEM_MESSAGE",
    "QUESTION_TEMPLATES",
    "ANSWER_TEMPLATES",
    "render_conversation",
    "evaluation_prompt",
    "training_prompt",
]
