"""Referring-segmentation metrics (SPEC section 6): cIoU, two gIoU conventions, REC Prec@0.5, GRES N-acc/T-acc.

No model dependency: numpy only. Everything is measured at the original image resolution.

Per expression ``i`` we count ``I_i = |gt & pred|`` and ``U_i = |gt | pred|`` (pixels) and ``IoU_i = I_i / U_i``,
with an empty union counted as IoU 1.

* ``cIoU`` = sum_i I_i / sum_i U_i over the split.
* ``gIoU_per_expression`` = mean_i IoU_i (LISA convention).
* ``gIoU_per_image`` = mean over images of the mean IoU of that image's expressions (MLLMSeg reference convention).
* ``prec@0.5`` (REC) = fraction of expressions whose box from the predicted mask (:func:`box_from_mask`) has
  :func:`box_iou` > 0.5 (strict) with the ground-truth box ``[x, y, x + w, y + h]``.
* GRES (GSVA protocol), active for an expression when ``pred_rejected`` is given:
    - no target (empty GT) & ``[REJ]`` predicted: IoU 1, nothing added to I or U;
    - no target & ``[SEG]`` predicted: IoU 0, U += predicted area;
    - target present: mask IoU as usual, whatever was predicted (the caller passes the mask of the pass in which
      every ``[REJ]`` was replaced by ``[SEG]``).
  ``N-acc`` = TP / (TP + FN) over no-target expressions (TP: rejected), ``T-acc`` = TN / (TN + FP) over targeted
  ones (TN: not rejected).

Distributed use: every process fills its own :class:`ReferringMetrics`; gather the plain ``state_dict()`` of each
process (e.g. ``accelerate.utils.gather_object([m.state_dict()])``) and call :func:`merge_states` then
:func:`compute_metrics` (or ``ReferringMetrics.from_states(gathered).compute()``). Per-image sums are keyed by image
id, so an image whose expressions were spread over several processes still averages correctly.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import numpy as np

from ..data.records import as_bool_mask, box_from_mask, xywh_to_xyxy  # noqa: F401  (xywh_to_xyxy re-exported: callers of the metrics use it)

_SCALARS = ("inter", "union", "iou_sum", "n_expr", "rec_hits", "n_rec", "nt_tp", "nt_fn", "t_tn", "t_fp")


def box_iou(a, b) -> np.ndarray:
    """IoU of ``[..., 4]`` ``[x0, y0, x1, y1]`` boxes (broadcasting), returns ``[...]`` float.

    Plain continuous formula on the given coordinates, no ``+1``: area = (x1 - x0) * (y1 - y0). With
    :func:`box_from_mask` (inclusive indices) a box is therefore one pixel smaller per side than the pixel count
    (as in the reference evaluation). A zero union gives IoU 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def empty_state() -> Dict[str, Any]:
    """A fresh accumulator state: plain python ints/floats plus per-image dicts keyed by image id."""
    state: Dict[str, Any] = {k: 0 for k in _SCALARS}
    state["iou_sum"] = 0.0
    state["image_iou_sum"] = {}  # image_id -> sum of IoU_i over that image's expressions
    state["image_count"] = {}  # image_id -> number of expressions of that image
    return state


def merge_states(states: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """Sum several states (e.g. one per process, as gathered) into a new state; inputs are not modified."""
    out = empty_state()
    for s in states:
        for k in _SCALARS:
            out[k] += s[k]
        for key in ("image_iou_sum", "image_count"):
            for img, v in s[key].items():
                out[key][img] = out[key].get(img, 0) + v
    return out


def _ratio(num, den) -> Optional[float]:
    return float(num) / float(den) if den > 0 else None


def compute_metrics(state: Dict[str, Any]) -> Dict[str, Any]:
    """Metrics from a (merged) state. Undefined metrics (nothing counted for them) are ``None``.

    Keys: ``cIoU``, ``gIoU_per_expression``, ``gIoU_per_image``, ``prec@0.5``, ``N-acc``, ``T-acc``, and the counts
    ``n_expressions``, ``n_images``, ``n_rec`` (expressions with a GT box), ``n_no_target`` / ``n_targeted`` (GRES
    expressions with a rejection decision), ``I_sum``, ``U_sum``. ``cIoU`` is 1.0 when expressions were counted but
    the total union is empty (every union empty or every no-target correctly rejected).
    """
    n = state["n_expr"]
    ciou = _ratio(state["inter"], state["union"]) if state["union"] > 0 else (1.0 if n > 0 else None)
    per_image = [state["image_iou_sum"][k] / state["image_count"][k] for k in state["image_count"]]
    return {
        "cIoU": ciou,
        "gIoU_per_expression": _ratio(state["iou_sum"], n),
        "gIoU_per_image": float(np.mean(per_image)) if per_image else None,
        "prec@0.5": _ratio(state["rec_hits"], state["n_rec"]),
        "N-acc": _ratio(state["nt_tp"], state["nt_tp"] + state["nt_fn"]),
        "T-acc": _ratio(state["t_tn"], state["t_tn"] + state["t_fp"]),
        "n_expressions": n,
        "n_images": len(per_image),
        "n_rec": state["n_rec"],
        "n_no_target": state["nt_tp"] + state["nt_fn"],
        "n_targeted": state["t_tn"] + state["t_fp"],
        "I_sum": state["inter"],
        "U_sum": state["union"],
    }


class ReferringMetrics:
    """Accumulates per-expression I/U, box hits and GRES decisions; see the module docstring for definitions."""

    def __init__(self) -> None:
        self.state = empty_state()

    def add(
        self,
        image_id,
        gt_mask,
        pred_mask,
        gt_box=None,
        pred_rejected: Optional[bool] = None,
        no_target: Optional[bool] = None,
    ) -> float:
        """Count one expression; returns its IoU.

        Args:
            image_id: hashable image key (groups expressions for ``gIoU_per_image``).
            gt_mask: ``[H, W]`` ground truth at original resolution; empty = no target.
            pred_mask: ``[H, W]`` prediction (bool, {0, 1} or probabilities thresholded at > 0.5).
            gt_box: optional ``[4]`` ground-truth box ``[x0, y0, x1, y1]`` (COCO ``[x, y, x + w, y + h]``, see
                :func:`xywh_to_xyxy`); when given, the expression counts for ``prec@0.5``.
            pred_rejected: GRES only: whether ``[REJ]`` was predicted. ``None`` = plain RES (no N-acc/T-acc).
            no_target: override of "GT is empty" (must agree with an empty ``gt_mask`` when True).
        """
        gt, pred = as_bool_mask(gt_mask), as_bool_mask(pred_mask)
        if gt.shape != pred.shape or gt.ndim != 2:
            raise ValueError(f"gt_mask {gt.shape} and pred_mask {pred.shape} must be the same [H, W]")
        return self.add_counts(
            image_id,
            inter=int(np.count_nonzero(gt & pred)),
            union=int(np.count_nonzero(gt | pred)),
            gt_empty=not gt.any(),
            pred_box=box_from_mask(pred) if gt_box is not None else None,
            gt_box=gt_box,
            pred_rejected=pred_rejected,
            no_target=no_target,
        )

    def add_counts(
        self,
        image_id,
        inter: int,
        union: int,
        gt_empty: bool,
        pred_box=None,
        gt_box=None,
        pred_rejected: Optional[bool] = None,
        no_target: Optional[bool] = None,
    ) -> float:
        """Count one expression from its pixel counts (what :meth:`add` measures from the masks); returns its IoU.

        For callers that count on the model's device and bring only the numbers back (the evaluation loop).

        Args:
            inter, union: ``|gt & pred|`` and ``|gt | pred|`` in pixels at the original resolution.
            gt_empty: whether the ground-truth mask is empty.
            pred_box: ``[4]`` box of the predicted mask as :func:`box_from_mask` gives it (``[0, 0, 0, 0]`` when
                empty); needed when ``gt_box`` is given.
            image_id, gt_box, pred_rejected, no_target: as in :meth:`add`.
        """
        inter, union = int(inter), int(union)
        if not 0 <= inter <= union:
            raise ValueError(f"counts of image {image_id!r}: need 0 <= inter <= union, got inter {inter}, union {union}")
        no_target = bool(gt_empty) if no_target is None else bool(no_target)
        if no_target and not gt_empty:
            raise ValueError("no_target=True but gt_mask is not empty")
        if gt_box is not None and pred_box is None:
            raise ValueError(f"image {image_id!r}: gt_box given without pred_box (the predicted mask's box)")
        s = self.state
        if pred_rejected is not None:
            if no_target:
                s["nt_tp" if pred_rejected else "nt_fn"] += 1
            else:
                s["t_fp" if pred_rejected else "t_tn"] += 1
        if no_target and pred_rejected:
            inter, union, iou = 0, 0, 1.0
        else:
            iou = inter / union if union > 0 else 1.0
            if no_target and pred_rejected is not None:  # GRES: [SEG] on a no-target expression
                iou = 0.0
        s["inter"] += inter
        s["union"] += union
        s["iou_sum"] += iou
        s["n_expr"] += 1
        s["image_iou_sum"][image_id] = s["image_iou_sum"].get(image_id, 0.0) + iou
        s["image_count"][image_id] = s["image_count"].get(image_id, 0) + 1
        if gt_box is not None:
            s["n_rec"] += 1
            s["rec_hits"] += int(box_iou(pred_box, gt_box) > 0.5)
        return iou

    def state_dict(self) -> Dict[str, Any]:
        """A picklable copy of the state (plain python numbers and dicts)."""
        return merge_states([self.state])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state = merge_states([state])

    def merge(self, other_states: Iterable[Dict[str, Any]]) -> "ReferringMetrics":
        """Add other states (or accumulators) into this one, in place. Pass only *other* processes' states."""
        others = [o.state if isinstance(o, ReferringMetrics) else o for o in other_states]
        self.state = merge_states([self.state, *others])
        return self

    @classmethod
    def from_states(cls, states: Iterable[Dict[str, Any]]) -> "ReferringMetrics":
        """Accumulator holding the sum of ``states`` (e.g. all processes' states from ``gather_object``)."""
        out = cls()
        out.state = merge_states(states)
        return out

    def compute(self) -> Dict[str, Any]:
        return compute_metrics(self.state)

    def __len__(self) -> int:
        return self.state["n_expr"]


