import json
import pickle

import numpy as np
import pytest

from mllmseg.data.masks import decode_segmentation
from mllmseg.evaluation.metrics import (
    ReferringMetrics,
    box_from_mask,
    box_iou,
    compute_metrics,
    merge_states,
    xywh_to_xyxy,
)


def _load_coco(path):
    inst = json.loads(path.read_text())
    return {i["id"]: i for i in inst["images"]}, {a["id"]: a for a in inst["annotations"]}


def _ann_mask(ann, img):
    return decode_segmentation(ann["segmentation"], img["height"], img["width"])


# ---------------------------------------------------------------- golden values (SPEC section 6)


def test_golden_refcocog_umd_mini(fixtures_dir):
    d = fixtures_dir / "refcocog_umd_mini"
    with open(d / "refs(umd).p", "rb") as f:
        refs = pickle.load(f)
    images, anns = _load_coco(d / "instances.json")
    m = ReferringMetrics()
    for ref in refs:
        ann, img = anns[ref["ann_id"]], images[ref["image_id"]]
        gt = _ann_mask(ann, img)
        x, y, w, h = ann["bbox"]
        # Fill convention that reproduces the goldens: rows round(y) .. round(y + h) - 1 and columns
        # round(x) .. round(x + w) - 1 (python round of both edges, end exclusive). No coordinate in the fixture
        # is a .5 tie, so half-to-even vs half-up does not matter. (int/floor edges give cIoU 0.531532, inclusive
        # ends 0.527488: both miss.)
        pred = np.zeros_like(gt)
        pred[round(y) : round(y + h), round(x) : round(x + w)] = True
        for _ in ref["sentences"]:
            m.add(ref["image_id"], gt, pred, gt_box=xywh_to_xyxy(ann["bbox"]))
    r = m.compute()
    assert r["n_expressions"] == 28 and r["n_images"] == 15 and r["n_rec"] == 28
    assert round(r["cIoU"], 6) == 0.530975
    assert round(r["gIoU_per_expression"], 6) == 0.524431
    assert round(r["gIoU_per_image"], 6) == 0.532783
    assert r["prec@0.5"] == 1.0
    assert r["N-acc"] is None and r["T-acc"] is None


# ---------------------------------------------------------------- GRES, hand-checked


def test_gres_hand_checked(fixtures_dir):
    d = fixtures_dir / "grefcoco_constructed"
    grefs = {r["ref_id"]: r for r in json.loads((d / "grefs(unc).json").read_text())}
    images, anns = _load_coco(d / "instances.json")

    def gt_of(ref):
        img = images[ref["image_id"]]
        mask = np.zeros((img["height"], img["width"]), dtype=bool)
        for a in ref["ann_id"]:
            if a != -1:
                mask |= _ann_mask(anns[a], img)
        return mask

    chair_a = _ann_mask(anns[101932], images[6051])  # image 6051 is 459 x 640
    chair_b = _ann_mask(anns[107835], images[6051])
    # Areas the hand computation below relies on (pycocotools rasterisation); the two chairs do not overlap.
    assert chair_a.sum() == 32203 and chair_b.sum() == 23413 and (chair_a | chair_b).sum() == 55616

    m = ReferringMetrics()
    # 1, 2) ref 8061 ("the chair which is above the dog" = chair_a), two sentences: perfect mask, [SEG].
    #       IoU 1 each, I = U = 32203 each; targeted & not rejected -> TN x2.
    r8061 = grefs[8061]
    assert r8061["ann_id"] == [101932] and len(r8061["sentences"]) == 2
    for _ in r8061["sentences"]:
        assert m.add(6051, gt_of(r8061), chair_a, pred_rejected=False) == 1.0
    # 3) no-target 900004 on 6051, [REJ] (the mask of the all-[SEG] pass, here the whole image, is ignored):
    #    IoU 1, nothing added to I/U; TP.
    r = grefs[900004]
    assert r["no_target"] and r["ann_id"] == [-1]
    assert m.add(6051, gt_of(r), np.ones((459, 640), bool), pred_rejected=True, no_target=True) == 1.0
    # 4) no-target 900005 on 6051, [SEG] with a 10 x 20 = 200 px mask: IoU 0, U += 200; FN.
    pred = np.zeros((459, 640), bool)
    pred[100:110, 200:220] = True
    assert m.add(6051, gt_of(grefs[900005]), pred, pred_rejected=False, no_target=True) == 0.0
    # 5) multi-target 900016 (both chairs) wrongly rejected: FP; the all-[SEG] pass mask covers chair_a only:
    #    I = 32203, U = 55616, IoU = 32203 / 55616.
    r = grefs[900016]
    assert r["ann_id"] == [101932, 107835]
    assert m.add(6051, gt_of(r), chair_a, pred_rejected=True) == pytest.approx(32203 / 55616)
    # 6) no-target 900006 on 6051, [REJ], no_target inferred from the empty GT: IoU 1; TP.
    m.add(6051, gt_of(grefs[900006]), np.zeros((459, 640), bool), pred_rejected=True)
    # 7) no-target 900003 on image 91130, [REJ]: IoU 1; TP.
    r = grefs[900003]
    assert r["image_id"] == 91130
    m.add(91130, gt_of(r), np.zeros((441, 640), bool), pred_rejected=True)

    out = m.compute()
    q = 32203 / 55616  # ~0.579024
    # cIoU = (32203 + 32203 + 32203) / (32203 + 32203 + 200 + 55616) = 96609 / 120222 ~ 0.803588
    assert out["I_sum"] == 96609 and out["U_sum"] == 120222
    assert out["cIoU"] == pytest.approx(96609 / 120222)
    # per expression: (1 + 1 + 1 + 0 + q + 1 + 1) / 7 ~ 0.797003
    assert out["gIoU_per_expression"] == pytest.approx((5 + q) / 7)
    # per image: image 6051 -> (1 + 1 + 1 + 0 + q + 1) / 6, image 91130 -> 1; mean ~ 0.881752
    assert out["gIoU_per_image"] == pytest.approx(((4 + q) / 6 + 1) / 2)
    # N-acc = TP / (TP + FN) = 3 / 4 (900004, 900006, 900003 rejected; 900005 not)
    # T-acc = TN / (TN + FP) = 2 / 3 (8061 x2 kept; 900016 rejected)
    assert out["N-acc"] == 0.75 and out["T-acc"] == pytest.approx(2 / 3)
    assert out["n_no_target"] == 4 and out["n_targeted"] == 3 and out["n_images"] == 2


def test_gres_seg_on_no_target_is_zero_even_with_empty_mask():
    # GSVA: a no-target expression answered with [SEG] scores 0, even if its mask happens to be empty
    # (without a rejection decision, i.e. plain RES, the empty union counts as 1).
    z = np.zeros((3, 3), bool)
    m = ReferringMetrics()
    assert m.add(0, z, z, pred_rejected=False) == 0.0
    assert m.add(0, z, z, pred_rejected=True) == 1.0
    assert m.add(0, z, z) == 1.0
    r = m.compute()
    assert r["gIoU_per_expression"] == pytest.approx(2 / 3) and r["N-acc"] == 0.5 and r["T-acc"] is None


def test_no_target_flag_must_match_gt():
    m = ReferringMetrics()
    with pytest.raises(ValueError):
        m.add(0, np.ones((3, 3), bool), np.ones((3, 3), bool), pred_rejected=True, no_target=True)
    with pytest.raises(ValueError):
        m.add(0, np.ones((3, 3), bool), np.ones((3, 4), bool))


# ---------------------------------------------------------------- synthetic


def test_empty_union_counts_as_one():
    m = ReferringMetrics()
    z = np.zeros((4, 5), bool)
    assert m.add("a", z, z) == 1.0
    r = m.compute()
    assert r["gIoU_per_expression"] == 1.0 and r["gIoU_per_image"] == 1.0 and r["cIoU"] == 1.0
    # add an IoU 1/2 expression: gIoU = (1 + 0.5) / 2, cIoU only sees the second one (I 2 / U 4)
    gt, pred = z.copy(), z.copy()
    gt[0, :2] = True
    pred[0, :4] = True
    assert m.add("b", gt, pred) == 0.5
    r = m.compute()
    assert r["gIoU_per_expression"] == 0.75 and r["cIoU"] == 0.5


def test_giou_conventions_differ():
    # image A: IoUs 1, 0, 1 ; image B: IoU 0 -> per expression 2/4, per image (2/3 + 0) / 2 = 1/3
    m = ReferringMetrics()
    one, other = np.zeros((2, 2), bool), np.zeros((2, 2), bool)
    one[0, 0] = True
    other[1, 1] = True
    for img, pred in (("A", one), ("A", other), ("A", one), ("B", other)):
        m.add(img, one, pred)
    r = m.compute()
    assert r["gIoU_per_expression"] == 0.5
    assert r["gIoU_per_image"] == pytest.approx(1 / 3)
    assert r["cIoU"] == pytest.approx(2 / 6)  # I = 2, U = 1 + 2 + 1 + 2


def test_box_from_mask_inclusive_indices():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:8] = True  # rows 2..4, cols 3..7
    mask[7, 1] = True
    np.testing.assert_array_equal(box_from_mask(mask), [1, 2, 7, 7])
    single = np.zeros((5, 5), bool)
    single[4, 2] = True
    np.testing.assert_array_equal(box_from_mask(single), [2, 4, 2, 4])
    np.testing.assert_array_equal(box_from_mask(np.zeros((5, 5), bool)), [0, 0, 0, 0])
    # batched, and probabilities thresholded at > 0.5
    probs = np.stack([mask * 0.9, np.full((10, 12), 0.5)])
    np.testing.assert_array_equal(box_from_mask(probs), [[1, 2, 7, 7], [0, 0, 0, 0]])


def test_box_iou_plain_formula():
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10], [0, 0, 4, 4]], [0, 0, 10, 5]), [0.5, 16 / 50])  # inter 4*4, union 16 + 50 - 16
    np.testing.assert_array_equal(xywh_to_xyxy([1.5, 2, 3, 4]), [1.5, 2, 4.5, 6])


def test_prec_strictly_above_half():
    pred = np.zeros((20, 20), bool)
    pred[0:11, 0:11] = True  # box [0, 0, 10, 10] (inclusive indices), area 100 under the plain formula
    m = ReferringMetrics()
    m.add(0, pred, pred, gt_box=[0, 0, 10, 5])  # IoU exactly 50 / 100 -> miss
    assert m.compute()["prec@0.5"] == 0.0
    m.add(0, pred, pred, gt_box=[0, 0, 10, 6])  # IoU 60 / 100 -> hit
    r = m.compute()
    assert r["prec@0.5"] == 0.5 and r["n_rec"] == 2


def test_merge_across_processes_equals_single():
    rng = np.random.default_rng(0)
    # 10 expressions over 3 images; image 1 is split 3 / 1 across the two "processes", so averaging each
    # process's per-image means would be wrong.
    images = [0, 0, 1, 1, 1, 2, 1, 2, 2, 0]
    split = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    rows = []
    for k, img in enumerate(images):
        gt = rng.random((6, 7)) > 0.5
        if k == 8:
            gt[:] = False  # a no-target
        pred = rng.random((6, 7)) > 0.4
        rows.append((img, gt, pred, xywh_to_xyxy([1, 1, 3, 2]), bool(k % 3 == 0)))
    full, procs = ReferringMetrics(), [ReferringMetrics(), ReferringMetrics()]
    for (img, gt, pred, box, rej), p in zip(rows, split):
        full.add(img, gt, pred, gt_box=box, pred_rejected=rej)
        procs[p].add(img, gt, pred, gt_box=box, pred_rejected=rej)
    # states survive pickling (what gather_object does)
    states = [pickle.loads(pickle.dumps(p.state_dict())) for p in procs]
    expected = full.compute()
    merged_a = compute_metrics(merge_states(states))
    merged_b = ReferringMetrics.from_states(states).compute()
    merged_c = procs[0].merge([states[1]]).compute()
    for got in (merged_a, merged_b, merged_c):
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    # a naive mean of per-process per-image means would differ for this split
    naive = np.mean(
        [
            np.mean([s["image_iou_sum"][i] / s["image_count"][i] for s in states if i in s["image_count"]])
            for i in (0, 1, 2)
        ]
    )
    assert naive != pytest.approx(expected["gIoU_per_image"])


def test_add_counts_equals_add_on_masks():
    # What the evaluation loop counts on the model's device (I, U, |gt|, the predicted box) gives the state `add`
    # gives from the masks, GRES decisions and boxes included; impossible counts are refused.
    rng = np.random.default_rng(1)
    from_masks, from_counts = ReferringMetrics(), ReferringMetrics()
    for k in range(12):
        gt = rng.random((9, 11)) > 0.6 if k % 4 else np.zeros((9, 11), bool)
        pred = rng.random((9, 11)) > (0.5 if k % 5 else 1.0)  # k = 0, 5, 10: empty predictions
        rejected = None if k < 4 else bool(k % 2)
        box = xywh_to_xyxy([1, 2, 4, 3]) if k % 3 else None
        from_masks.add(k // 3, gt, pred, gt_box=box, pred_rejected=rejected, no_target=not gt.any())
        from_counts.add_counts(k // 3, int((gt & pred).sum()), int((gt | pred).sum()), gt_empty=not gt.any(),
                               pred_box=box_from_mask(pred), gt_box=box, pred_rejected=rejected,
                               no_target=not gt.any())
    assert from_counts.state_dict() == from_masks.state_dict()
    assert from_masks.compute()["n_no_target"] > 0 and from_masks.compute()["n_rec"] > 0
    with pytest.raises(ValueError, match="need 0 <= inter <= union, got inter 5, union 3"):
        from_counts.add_counts("x", 5, 3, gt_empty=False)
    with pytest.raises(ValueError, match="gt_box given without pred_box"):
        from_counts.add_counts("x", 1, 3, gt_empty=False, gt_box=[0, 0, 1, 1])
