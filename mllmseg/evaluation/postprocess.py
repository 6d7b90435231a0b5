"""Scoring on the model's device: mask logits in, per-expression pixel counts out.

Shapes use: B = samples, M = `[SEG]` slots (expressions) of the batch, E_b = those of sample b, (H_c, W_c) = the
tile canvas of a sample, (h, w) = its original size.

What `segment` does on the CPU after the forward (sigmoid, bilinear resize to the original size, threshold, boxes,
scores: `MLLMSegProcessor.post_process_segmentation` / `post_process_generation`) is done here where the logits
are, with the processor's own `post_process_masks`, and compared with the ground truth there: only the counts, one
small `(M, 8)` tensor per batch, leave the device (and the masks themselves when predictions with RLE are asked for).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Columns of `ExpressionCounts.counts`.
INTER, UNION, GT_AREA, X0, Y0, X1, Y1, REJECTED = range(8)


@dataclass
class ExpressionCounts:
    """Per expression of a batch (samples in order, expressions in order), on the CPU.

    Attributes:
        counts: `(M, 8)` int64: `|gt & pred|`, `|gt | pred|`, `|gt|`, the box `x0, y0, x1, y1` of the predicted
            mask (inclusive pixel indices, `[0, 0, 0, 0]` when empty: `metrics.box_from_mask`'s convention) and
            whether `[REJ]` was chosen. `pred` is the mask of the expression's `[SEG]` slot, also where `[REJ]` won
            (the GRES protocol scores targeted expressions on it).
        scores: `(M,)` mean probability over the returned mask (the slot mask, empty where rejected; 0 if empty),
            only when the masks are asked for.
        seg_probs: `(M,)` probability of `[SEG]` against `[REJ]` at the slot.
        masks: per sample `(E_b, h, w)` bool returned masks (empty where rejected), only when asked for.
    """

    counts: torch.Tensor
    scores: torch.Tensor | None
    seg_probs: torch.Tensor
    masks: list[torch.Tensor] | None = None


def pixel_counts(masks: torch.Tensor) -> torch.Tensor:
    """`(M, h, w)` bool -> `(M,)` int64 number of True pixels. Summed as uint8 into int32 (exact below 2**31 pixels
    per mask): on the CPU several times faster than summing the bools, which goes through int64 (issue 21)."""
    return masks.view(torch.uint8).flatten(1).sum(1, dtype=torch.int32).long()


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """`(M, h, w)` bool -> `(M, 4)` int64 `[x0, y0, x1, y1]`, inclusive pixel indices, `[0, 0, 0, 0]` for an empty
    mask (the metrics' `box_from_mask`, on the masks' device; the processor's `masks_to_boxes` builds its index
    ranges on the CPU)."""
    as_bytes = masks.view(torch.uint8)
    rows, cols = as_bytes.amax(dim=2).bool(), as_bytes.amax(dim=1).bool()  # (M, h), (M, w); `any` is slower on CPU
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    boxes = torch.stack([
        torch.where(cols, ar_w, w).amin(1), torch.where(rows, ar_h, h).amin(1),
        torch.where(cols, ar_w, -1).amax(1), torch.where(rows, ar_h, -1).amax(1),
    ], 1)
    return torch.where(rows.any(1, keepdim=True), boxes, 0)


def sample_counts(processor, mask_logits: torch.Tensor, original_size, gt: torch.Tensor, rejected: torch.Tensor,
                  threshold: float, keep_masks: bool):
    """One sample's counts on the device of `mask_logits`.

    Args:
        mask_logits: `(E, H_c, W_c)` logits on the tile canvas.
        original_size: (h, w).
        gt: `(E, h, w)` bool ground truth (any device; moved to the logits').
        rejected: `(E,)` bool on the logits' device.
        keep_masks: also return the returned masks and their scores (for predictions).

    Returns (`(E, 7)` int64 counts without the rejection column, `(E,)` scores or None, the masks or None).
    """
    probs, slot_masks = processor.post_process_masks(mask_logits, original_size, threshold)
    probs, slot_masks = probs.to(mask_logits.device), slot_masks.to(mask_logits.device)  # (no slots: CPU empties)
    gt = gt.to(mask_logits.device, non_blocking=True)
    if gt.shape != slot_masks.shape:
        raise ValueError(f"ground truth {tuple(gt.shape)} does not match the predicted masks {tuple(slot_masks.shape)} "
                         "(expressions, height, width)")
    inter, gt_area = pixel_counts(gt & slot_masks), pixel_counts(gt)
    union = gt_area + pixel_counts(slot_masks) - inter
    counts = torch.cat([inter[:, None], union[:, None], gt_area[:, None], mask_boxes(slot_masks)], 1)
    if not keep_masks:
        return counts, None, None
    masks = slot_masks & ~rejected[:, None, None]
    # The score as `post_process_segmentation` computes it (same operations, same order).
    area = masks.flatten(1).sum(1)
    scores = torch.where(area > 0, (probs * masks).flatten(1).sum(1) / area.clamp(min=1),
                         torch.zeros_like(area, dtype=probs.dtype))
    return counts, scores, masks


def batch_counts(processor, mask_logits, original_sizes, gt_masks, rejected: torch.Tensor, seg_probs: torch.Tensor,
                 threshold: float = 0.5, keep_masks: bool = False) -> ExpressionCounts:
    """[`ExpressionCounts`] of a batch: `mask_logits` per sample `(E_b, H_c, W_c)`, `rejected` / `seg_probs`
    `(M,)` over the batch's slots in order (on the logits' device); one transfer to the CPU at the end."""
    parts, scores, masks, start = [], [], [], 0
    for b, logits in enumerate(mask_logits):
        n = len(gt_masks[b])
        counts, score, kept = sample_counts(processor, logits, original_sizes[b], gt_masks[b],
                                            rejected[start : start + n], threshold, keep_masks)
        parts.append(counts)
        scores.append(score)
        masks.append(kept)
        start += n
    counts = torch.cat([torch.cat(parts), rejected[:, None].long()], 1)
    return ExpressionCounts(
        counts=counts.cpu(),
        scores=torch.cat(scores).float().cpu() if keep_masks else None,
        seg_probs=seg_probs.float().cpu(),
        masks=[m.cpu() for m in masks] if keep_masks else None,
    )


def fast_slot_decisions(processor, outputs, expected: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rejected` `(M,)`, `seg_probs` `(M,)`) of a teacher-forced forward, on its device, by the processor's rule
    (`slot_decisions`, as `post_process_segmentation`). `expected`: expressions per sample; the slots must come
    sample by sample in that number."""
    sample_of_slot = outputs.seg_sample
    wanted = torch.repeat_interleave(torch.arange(len(expected), device=sample_of_slot.device),
                                     torch.tensor(expected, device=sample_of_slot.device))
    if sample_of_slot.shape != wanted.shape or not torch.equal(sample_of_slot, wanted):  # one sync
        got = torch.bincount(sample_of_slot, minlength=len(expected)).tolist()
        raise ValueError(f"[SEG] slots per sample {got} (in order) do not match the expressions per sample "
                         f"{list(expected)}")
    return processor.slot_decisions(outputs.seg_logits)


def generated_slot_logits(processor, answer_ids: list[list[int]], mask_logits: list[torch.Tensor],
                          expected: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Generated answers -> (per sample `(E_b, H_c, W_c)` slot logits, `rejected` `(M,)`), by the processor's rule
    (`generated_slot_masks`, as `post_process_generation`), on the logits' device."""
    out, rejected = [], []
    for b, n in enumerate(expected):
        logits, rejected_b = processor.generated_slot_masks(processor.trim_answer(answer_ids[b]), mask_logits[b], n)
        out.append(logits)
        rejected.append(rejected_b)
    return out, torch.cat(rejected)
