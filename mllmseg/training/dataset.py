"""Training conversations over referring-segmentation samples (SPEC sections 3-4).

One item per image: up to `MAX_EXPRESSIONS_PER_SAMPLE` of its expressions (a random subset in random order, as
the reference samples sentences), rendered with `training_prompt` (random question / answer templates, `[REJ]`
where the ground-truth mask is empty). The random choices of item `index` in epoch `epoch` come from
`random.Random(f"{seed}:{epoch}:{index}")`: the same in every process and worker, whatever the access order.
"""
from __future__ import annotations

import io
import random
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..remote_code.conversation_mllmseg import (
    MAX_EXPRESSIONS_PER_SAMPLE,
    evaluation_prompt,
    MarkedText,
    mark_user_text,
    training_prompt,
)


def referent_is_empty(referent) -> bool:
    """`[REJ]` slots: expressions marked no-target, or whose mask has no pixel."""
    return bool(referent.no_target) or not bool(np.asarray(referent.mask).any())


class ConversationDataset(torch.utils.data.Dataset):
    """Wraps a sequence of `ReferringSample` into training conversations.

    Args:
        samples: any sequence of `ReferringSample` (synthetic, refer, gRefCOCO, Hub adapters).
        seed: base seed of the per-item random choices.
        max_expressions: expressions per conversation (the reference: 5).
        jpeg_prob: probability of re-encoding the image as JPEG (the reference augmentation), quality drawn from
            `jpeg_quality`; 0 disables it.
        eval_prompt_prob: probability of using the evaluation prompt (`evaluation_prompt`) instead of a training
            template; 0 is the reference recipe.

    Items are dicts: `image` (PIL RGB), `question`, `answer`, `masks` (bool tensor `(num_seg, H, W)` at the original
    size, one per `[SEG]` in answer order, or None when every expression is `[REJ]`), `expressions`, `no_target`.
    """

    def __init__(
        self,
        samples: Sequence,
        seed: int = 0,
        max_expressions: int = MAX_EXPRESSIONS_PER_SAMPLE,
        jpeg_prob: float = 0.0,
        jpeg_quality: tuple[int, int] = (75, 100),
        eval_prompt_prob: float = 0.0,
    ):
        if max_expressions < 1:
            raise ValueError(f"max_expressions must be >= 1, got {max_expressions}")
        self.samples = samples
        self.seed = int(seed)
        self.max_expressions = int(max_expressions)
        self.jpeg_prob = float(jpeg_prob)
        self.jpeg_quality = (int(jpeg_quality[0]), int(jpeg_quality[1]))
        self.eval_prompt_prob = float(eval_prompt_prob)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        rng = self.rng(index)
        referents = list(sample.referents)
        if not referents:
            raise ValueError(f"sample {sample.image_id!r} has no referring expressions")
        chosen = rng.sample(range(len(referents)), min(len(referents), self.max_expressions))
        picked = [referents[i] for i in chosen]
        texts = [r.text for r in picked]
        empty = [referent_is_empty(r) for r in picked]
        marked = [mark_user_text(t) for t in texts]  # expressions are user text: the processor escapes them
        if self.eval_prompt_prob and rng.random() < self.eval_prompt_prob:
            question, answer = evaluation_prompt(marked, empty)
        else:
            question, answer = training_prompt(marked, empty, rng)
        question, answer = MarkedText(question), MarkedText(answer)
        seg_masks = [torch.from_numpy(np.asarray(r.mask, dtype=bool)) for r, e in zip(picked, empty) if not e]
        image = sample.image
        if self.jpeg_prob and rng.random() < self.jpeg_prob:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=rng.randint(*self.jpeg_quality))
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return {
            "image": image,
            "question": question,
            "answer": answer,
            "masks": torch.stack(seg_masks) if seg_masks else None,
            "expressions": texts,
            "no_target": empty,
        }


__all__ = ["ConversationDataset", "referent_is_empty"]
