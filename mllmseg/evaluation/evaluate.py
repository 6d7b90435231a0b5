"""Evaluation loop: a model, its processor and a referring dataset in, the field's metrics out.

Works on one process or data-parallel under accelerate: samples are split between processes and the metric
states (plain sums, see `metrics.py`) are gathered and merged, so the numbers equal a single-process run.
"""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from .metrics import ReferringMetrics, compute_metrics, merge_states


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
) -> dict[str, Any]:
    """Segment every referent of every sample and score it (SPEC section 6).

    Args:
        model: an MLLMSeg model (local or remote-code class).
        processor: its processor.
        dataset: a sequence of `ReferringSample` (synthetic, refer, gRefCOCO, Hub adapters).
        mode: `"fast"` (teacher-forced, the paper protocol) or `"generate"`.
        limit: evaluate the first `limit` samples only.
        accelerator: an `accelerate.Accelerator` for data-parallel evaluation (None: this process does all).
        return_predictions: also return per-expression predictions (COCO RLE, box, score, rejected).

    Returns `{"metrics": {...}, "metrics_by_category": {...}?, "predictions": [...]?}`; on every process the same
    merged metrics. `metrics_by_category` (the same metrics over each `Referent.category`) is there when the
    dataset labels its referents with categories, as the synthetic set does.
    The GRES protocol applies throughout: a `[REJ]` answer counts as a no-target prediction, and a targeted
    expression is scored on the mask of its `[SEG]` slot whatever was decided there (the mask of the all-`[SEG]`
    pass, which the fast mode computes anyway).
    """
    num_samples = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(num_samples))
    if accelerator is not None:
        with accelerator.split_between_processes(indices) as mine:
            indices = list(mine)
    metrics = ReferringMetrics()
    by_category: dict[str, ReferringMetrics] = {}
    predictions = []
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    bar = tqdm(total=len(indices), desc=f"evaluate ({mode})", disable=not show)
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start : start + batch_size]]
        results = model.segment(
            processor,
            [s.image for s in samples],
            [[r.text for r in s.referents] for s in samples],
            mode=mode,
            tiling=tiling,
            return_rle=return_predictions,
            batch_size=batch_size,
        )
        for sample, result in zip(samples, results):
            slot_masks = (result.probabilities >= 0.5).numpy()  # the [SEG]-slot mask, also where [REJ] won
            for k, referent in enumerate(sample.referents):
                rejected = bool(result.rejected[k])
                scored = [metrics]
                if referent.category is not None:
                    scored.append(by_category.setdefault(referent.category, ReferringMetrics()))
                for m in scored:
                    m.add(
                        sample.image_id,
                        referent.mask,
                        slot_masks[k],
                        gt_box=referent.box,
                        pred_rejected=rejected,
                        no_target=referent.no_target,
                    )
                if return_predictions:
                    predictions.append(
                        {
                            "image_id": sample.image_id,
                            "ref_id": referent.ref_id,
                            "sent_id": referent.sent_id,
                            "expression": referent.text,
                            "rejected": rejected,
                            "score": float(result.scores[k]),
                            "seg_prob": float(result.seg_probs[k]),
                            "box": [float(v) for v in result.boxes[k]],
                            "rle": result.rle[k],
                        }
                    )
        bar.update(len(samples))
    bar.close()
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
