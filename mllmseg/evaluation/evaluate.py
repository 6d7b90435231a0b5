"""Evaluation loop: a model, its processor and a referring dataset in, the field's metrics out.

[`evaluate_dataset`] keeps the model busy: `DataLoader` workers read the samples, rasterise their ground truth and
build the model's batches (tiling, prompts, padding; `batches.py`) while the model runs, batches group samples of
similar tile count and prompt length, and the masks are scored on the model's device (`postprocess.py`): only
per-expression counts come back. [`evaluate_with_segment`] is the plain loop over the public `segment` API (all in
this process, masks scored on the CPU); both give the same metric state, and the benchmark compares them
(`benchmarks/bench_evaluation.py`).

Both work on one process or data-parallel under accelerate: samples are split between processes and the metric
states (plain sums, see `metrics.py`) are gathered and merged, so the numbers equal a single-process run.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..remote_code.inference_mllmseg import SEGMENT_MODES
from .batches import EvalBatch, EvaluationCollator, default_num_workers, evaluation_loader
from .metrics import ReferringMetrics, compute_metrics, merge_states
from .postprocess import (
    GT_AREA,
    INTER,
    REJECTED,
    UNION,
    X0,
    Y1,
    ExpressionCounts,
    batch_counts,
    fast_slot_decisions,
    generated_slot_logits,
)

EVALUATION_MODES = SEGMENT_MODES  # `segment`'s modes, one definition


def evaluate_dataset(
    model,
    processor,
    dataset,
    mode: str = "fast",
    limit: int | None = None,
    batch_size: int = 8,
    tiling: str | None = None,
    accelerator=None,
    return_predictions: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
    prefetch_factor: int = 2,
    group_by_length: bool = False,
    generation_config: dict | None = None,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Segment every referent of every sample and score it (SPEC section 6).

    Args:
        model: an MLLMSeg model (local or remote-code class).
        processor: its processor.
        dataset: a sequence of `ReferringSample` (synthetic, refer, gRefCOCO, Hub adapters); picklable when
            `num_workers > 0` and workers are spawned rather than forked.
        mode: `"fast"` (teacher-forced, the paper protocol), `"generate"`, or `"per_expression"` (each
            expression in its own conversation; run by [`evaluate_with_segment`], without loader workers).
        limit: evaluate the first `limit` samples only.
        batch_size: samples per model call.
        tiling: `"single"` or `"dynamic"`; default the model's `config.seg_tiling` (as `segment`).
        accelerator: an `accelerate.Accelerator` for data-parallel evaluation (None: this process does all).
        return_predictions: also return per-expression predictions (COCO RLE, box, score, rejected).
        num_workers: `DataLoader` workers preparing batches (0: in this process); default
            [`default_num_workers`] (up to 4, one CPU left to this process).
        prefetch_factor: loader items (see `group_window` in `batches.evaluation_loader`) prepared ahead per worker.
        group_by_length: batch samples of similar tile count and prompt length together (within windows of 4
            batches), for less padding. Off by default: another batch composition changes the float rounding of the
            forward (~3e-7 in the probabilities), which can move a pixel across the threshold, so the counts are
            then those of `segment` on other batches, not bit-identical to [`evaluate_with_segment`]'s.
        generation_config, max_new_tokens: `generate` mode only, as in `segment`.

    Returns `{"metrics": {...}, "metrics_by_category": {...}?, "predictions": [...]?}`; on every process the same
    merged metrics. `metrics_by_category` (the same metrics over each `Referent.category`) is there when the
    dataset labels its referents with categories, as the synthetic set does. Metrics are accumulated in dataset
    order whatever order the batches ran in, so (without `group_by_length`) the state equals
    [`evaluate_with_segment`]'s with the same `batch_size`, bit for bit.
    The GRES protocol applies throughout: a `[REJ]` answer counts as a no-target prediction, and a targeted
    expression is scored on the mask of its `[SEG]` slot whatever was decided there (the mask of the all-`[SEG]`
    pass, which the fast mode computes anyway).
    """
    if mode not in EVALUATION_MODES:
        raise ValueError(f"mode must be one of {EVALUATION_MODES}, got {mode!r}")
    if mode == "per_expression":  # its cached prefix passes live in `segment`; no prepared-batch path for them
        return evaluate_with_segment(model, processor, dataset, mode=mode, limit=limit, batch_size=batch_size,
                                     tiling=tiling, accelerator=accelerator, return_predictions=return_predictions,
                                     progress=progress)
    positions = _positions(dataset, limit, accelerator)
    num_processes = accelerator.num_processes if accelerator is not None else 1
    collator = EvaluationCollator(processor, mode, tiling or model.config.seg_tiling, batch_size, group_by_length)
    workers = default_num_workers(num_processes) if num_workers is None else num_workers
    batches = evaluation_loader(dataset, positions, collator, workers, prefetch_factor,
                                pin_memory=model.device.type == "cuda")
    rows = []
    bar = _progress_bar(progress, accelerator, len(positions), mode)
    for batch in batches:
        with torch.inference_mode():
            counts = score_batch(model, processor, batch, mode, return_predictions,
                                 dict(generation_config or {}, max_new_tokens=max_new_tokens))
        rows.extend(_expression_rows(processor, batch, counts, return_predictions))
        bar.update(len(batch.indices))
    bar.close()
    rows.sort(key=lambda row: row[0])  # dataset order: the same sums, added in the same order, as the plain loop
    metrics, by_category, predictions = ReferringMetrics(), {}, []
    for _, image_id, referent, c, prediction in rows:
        for m in _accumulators(referent, metrics, by_category):
            m.add_counts(image_id, c[INTER], c[UNION], gt_empty=c[GT_AREA] == 0, pred_box=c[X0 : Y1 + 1],
                         gt_box=referent.box, pred_rejected=bool(c[REJECTED]), no_target=referent.no_target)
        if return_predictions:
            predictions.append(prediction)
    return _merged_results(metrics, by_category, predictions, accelerator, mode, _num_samples(dataset, limit),
                           return_predictions)


def score_batch(model, processor, batch: EvalBatch, mode: str, keep_masks: bool = False,
                generation_config: dict | None = None) -> ExpressionCounts:
    """Run the model on one prepared batch and count every expression on its device (what `segment` computes,
    then compared with the ground truth there). `generation_config`: `generate` keywords (`generate` mode)."""
    device = model.device
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items() if k != "pixel_values"}
    pixel_values = batch.inputs["pixel_values"].to(device, model.dtype, non_blocking=True)
    expected = [len(refs) for refs in batch.referents]
    if mode == "fast":
        # As `segment(mode="fast")`: only the logits that predict each slot are computed (`logits_to_keep=1`).
        out = model(**inputs, pixel_values=pixel_values, logits_to_keep=1)
        rejected, seg_probs = fast_slot_decisions(processor, out, expected)
        mask_logits = out.pred_masks
    else:
        mask_logits, rejected = _generate(model, processor, inputs, pixel_values, expected, generation_config)
        rejected = rejected.to(device)
        seg_probs = (~rejected).float()
    return batch_counts(processor, mask_logits, batch.original_sizes, batch.gt_masks, rejected, seg_probs,
                        keep_masks=keep_masks)


def _generate(model, processor, inputs, pixel_values, expected, generation_config):
    """Free generation on a prepared batch: (per sample `(E_b, H_c, W_c)` slot logits, `rejected` `(M,)`).

    The steps of `segment(mode="generate")` (the model's `_segment_generate`, greedy unless configured otherwise),
    on a batch the workers built: the remote code has no public entry that takes a processed batch and returns the
    answer ids with their masks (`batch_chat` returns decoded text).
    """
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    config = model._generation_settings(processor, generation_config)
    config.setdefault("do_sample", False)
    image_outputs = model._image_outputs(pixel_values)
    sequences, states = model._generate_with_states(ids, attention, image_outputs, config)
    mask_logits = model._masks_from_states(sequences, states, image_outputs, inputs["tile_grids"], attention,
                                           config["eos_token_id"], reordered=int(config.get("num_beams", 1)) > 1)
    return generated_slot_logits(processor, sequences[:, ids.shape[1] :].tolist(), mask_logits, expected)


def _expression_rows(processor, batch: EvalBatch, counts: ExpressionCounts, with_predictions: bool) -> list[tuple]:
    """`((position, k), image_id, referent, counts row, prediction or None)` per expression of the batch."""
    table, seg_probs = counts.counts.tolist(), counts.seg_probs.tolist()
    scores = counts.scores.tolist() if with_predictions else None
    rows, i = [], 0
    for b, referents in enumerate(batch.referents):
        rles = processor.masks_to_rle(counts.masks[b]) if with_predictions else None
        for k, referent in enumerate(referents):
            c = table[i]
            prediction = None
            if with_predictions:
                # The returned mask is the slot mask unless rejected; an empty one has no box (NaN, as `segment`).
                kept = not c[REJECTED] and _has_pixels(c)
                box = [float(v) for v in c[X0 : Y1 + 1]] if kept else [float("nan")] * 4
                prediction = _prediction(batch.image_ids[b], referent, bool(c[REJECTED]), scores[i], seg_probs[i],
                                         box, rles[k])
            rows.append(((batch.indices[b], k), batch.image_ids[b], referent, c, prediction))
            i += 1
    return rows


def _has_pixels(c) -> bool:
    """Whether the slot mask of a counts row has any pixel: `|pred| = |gt | pred| - |gt| + |gt & pred|`."""
    return c[UNION] - c[GT_AREA] + c[INTER] > 0


def evaluate_with_segment(
    model,
    processor,
    dataset,
    mode: str = "fast",
    limit: int | None = None,
    batch_size: int = 8,
    tiling: str | None = None,
    accelerator=None,
    return_predictions: bool = False,
    progress: bool = True,
    generation_config: dict | None = None,
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """The plain loop: `batch_size` samples at a time through `model.segment`, everything in this process, masks
    scored on the CPU with `ReferringMetrics.add`. Same arguments and results as [`evaluate_dataset`] (which is
    faster); with `batch_size=1` it is the reference's loop (one image, all its expressions, per forward)."""
    positions = _positions(dataset, limit, accelerator)
    metrics: ReferringMetrics = ReferringMetrics()
    by_category: dict[str, ReferringMetrics] = {}
    predictions = []
    bar = _progress_bar(progress, accelerator, len(positions), mode)
    for start in range(0, len(positions), batch_size):
        samples = [dataset[i] for i in positions[start : start + batch_size]]
        results = model.segment(
            processor,
            [s.image for s in samples],
            [[r.text for r in s.referents] for s in samples],
            mode=mode,
            tiling=tiling,
            return_rle=return_predictions,
            batch_size=batch_size,
            generation_config=generation_config,
            max_new_tokens=max_new_tokens,
        )
        for sample, result in zip(samples, results):
            slot_masks = (result.probabilities >= 0.5).numpy()  # the [SEG]-slot mask, also where [REJ] won
            for k, referent in enumerate(sample.referents):
                rejected = bool(result.rejected[k])
                for m in _accumulators(referent, metrics, by_category):
                    m.add(sample.image_id, referent.mask, slot_masks[k], gt_box=referent.box, pred_rejected=rejected,
                          no_target=referent.no_target)
                if return_predictions:
                    predictions.append(_prediction(sample.image_id, referent, rejected, float(result.scores[k]),
                                                   float(result.seg_probs[k]), [float(v) for v in result.boxes[k]],
                                                   result.rle[k]))
        bar.update(len(samples))
    bar.close()
    return _merged_results(metrics, by_category, predictions, accelerator, mode, _num_samples(dataset, limit),
                           return_predictions)


# -- shared pieces -----------------------------------------------------------------------------------------------
def _num_samples(dataset, limit: int | None) -> int:
    return len(dataset) if limit is None else min(limit, len(dataset))


def _positions(dataset, limit: int | None, accelerator) -> list[int]:
    """This process's share of the first `limit` sample positions (contiguous, in order)."""
    positions = list(range(_num_samples(dataset, limit)))
    if accelerator is not None:
        with accelerator.split_between_processes(positions) as mine:
            positions = list(mine)
    return positions


def _progress_bar(progress: bool, accelerator, total: int, mode: str):
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    return tqdm(total=total, desc=f"evaluate ({mode})", disable=not show)


def _accumulators(referent, metrics: ReferringMetrics, by_category: dict[str, ReferringMetrics]) -> list:
    """The accumulators an expression counts in: the totals, and its category's when it has one."""
    if referent.category is None:
        return [metrics]
    return [metrics, by_category.setdefault(referent.category, ReferringMetrics())]


def _prediction(image_id, referent, rejected: bool, score: float, seg_prob: float, box: list[float], rle) -> dict:
    return {
        "image_id": image_id,
        "ref_id": referent.ref_id,
        "sent_id": referent.sent_id,
        "expression": referent.text,
        "rejected": rejected,
        "score": score,
        "seg_prob": seg_prob,
        "box": box,
        "rle": rle,
    }


def _merged_results(metrics: ReferringMetrics, by_category: dict[str, ReferringMetrics], predictions: list,
                    accelerator, mode: str, num_samples: int, return_predictions: bool) -> dict[str, Any]:
    """The results dict; under several processes the states (and predictions) of all of them, merged."""
    state = metrics.state_dict()
    category_states = {name: m.state_dict() for name, m in by_category.items()}
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(state, category_states)])  # one exchange for the totals and the categories
        state = merge_states([total for total, _ in gathered])
        names = sorted({name for _, per_category in gathered for name in per_category})
        category_states = {name: merge_states([c[name] for _, c in gathered if name in c]) for name in names}
        if return_predictions:
            predictions = gather_object(predictions)
    out: dict[str, Any] = {"metrics": compute_metrics(state), "mode": mode, "num_samples": num_samples}
    if category_states:
        out["metrics_by_category"] = {name: compute_metrics(category_states[name]) for name in sorted(category_states)}
    if return_predictions:
        out["predictions"] = predictions
    return out
