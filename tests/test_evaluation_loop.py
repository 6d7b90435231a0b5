"""Issue 21, evaluation throughput: `evaluate_dataset` (DataLoader workers build the batches, samples grouped by
length, masks scored on the model's device) gives the metric state of the plain `segment` loop
(`evaluate_with_segment`), on the synthetic set and on the refer layout, in both modes and both tilings, with and
without predictions; its device-side pieces equal the CPU ones they replace."""
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from mllmseg.data.records import ReferringSample, Referent, box_from_mask
from mllmseg.data.refer import ReferDataset
from mllmseg.data.synthetic import SyntheticReferringDataset
from mllmseg.evaluation.batches import EvaluationCollator, default_num_workers, evaluation_loader
from mllmseg.evaluation.evaluate import evaluate_dataset, evaluate_with_segment
from mllmseg.evaluation.postprocess import batch_counts, mask_boxes
from mllmseg.tiny import build_processor, build_tiny_model
from mllmseg.training.recipes import synthetic_scene_kwargs

COCO_NAME = "images/mscoco/images/train2014/COCO_train2014_{:012d}.jpg"
EXACT = ("I_sum", "U_sum", "n_expressions", "n_images", "n_rec", "n_no_target", "n_targeted")
RATIOS = ("cIoU", "gIoU_per_expression", "gIoU_per_image", "prec@0.5", "N-acc", "T-acc")

pytestmark = pytest.mark.filterwarnings("ignore:segment\\(mode='generate'\\)")


class SlotPattern(LogitsProcessor):
    """Forces each answer to a slot pattern, then the end of the turn: a random tiny model never writes `[SEG]`. The
    pattern depends on the row's own prompt (its real-token count), not on the batch, so that any batching forces
    the same answers: `[SEG] [REJ] [SEG] [SEG]` (more slots than 3 expressions) or `[SEG]` (fewer)."""

    def __init__(self, processor):
        self.seg, self.rej, self.pad = processor.seg_token_id, processor.rej_token_id, processor.tokenizer.pad_token_id
        self.end = processor.end_of_turn_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids):
            slots = int(((ids == self.seg) | (ids == self.rej)).sum())
            pattern = [self.seg, self.rej, self.seg, self.seg] if int((ids != self.pad).sum()) % 2 else [self.seg]
            forced[row, pattern[slots] if slots < len(pattern) else self.end] = 0.0
        return forced


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model(seed=0)
    return model.eval(), build_processor(tokenizer, model.config)


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticReferringDataset(6, seed=0, split="validation", **synthetic_scene_kwargs("tiny"))


@pytest.fixture(scope="module")
def refer(tmp_path_factory, fixtures_dir):
    """The RefCOCOg-mini val split in the refer layout, with seeded random images of the recorded sizes."""
    mini, root = fixtures_dir / "refcocog_umd_mini", tmp_path_factory.mktemp("refer")
    (root / "refcocog").mkdir()
    for name in ("refs(umd).p", "instances.json"):
        shutil.copy(mini / name, root / "refcocog" / name)
    rng = np.random.default_rng(0)
    for info in json.loads((mini / "instances.json").read_text())["images"]:
        path = root / COCO_NAME.format(info["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (info["height"] // 16, info["width"] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((info["width"], info["height"])).save(path)
    return ReferDataset(root, "refcocog", split="val")


def assert_same_results(plain, ours, same_batches=True):
    """Same batches: the same state and predictions, bit for bit. Other batch compositions (grouped by length):
    the forward rounds differently (~3e-7), which may move a pixel across the threshold: the same expressions and
    decisions, counts within a few pixels."""
    for got, want in [(ours["metrics"], plain["metrics"])] + [
        (ours["metrics_by_category"][name], m) for name, m in plain.get("metrics_by_category", {}).items()
    ]:
        if same_batches:
            assert got == want
        else:
            assert {k: got[k] for k in EXACT[2:]} == {k: want[k] for k in EXACT[2:]}
            for key in ("I_sum", "U_sum") + RATIOS:
                assert (got[key] is None and want[key] is None) or got[key] == pytest.approx(want[key], rel=1e-4), key
    assert ours.keys() == plain.keys() and ours["num_samples"] == plain["num_samples"]
    if "predictions" in plain:
        assert len(ours["predictions"]) == len(plain["predictions"]) == plain["metrics"]["n_expressions"]
        keys = ("image_id", "ref_id", "sent_id", "expression", "rejected") + (("rle",) if same_batches else ())
        for p, q in zip(plain["predictions"], ours["predictions"]):  # in dataset order
            assert {k: p[k] for k in keys} == {k: q[k] for k in keys}
            if same_batches:
                assert (q["score"], q["seg_prob"]) == (p["score"], p["seg_prob"])
                assert all((a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(p["box"], q["box"]))
            else:
                assert q["score"] == pytest.approx(p["score"], abs=1e-5)
                assert q["seg_prob"] == pytest.approx(p["seg_prob"], abs=1e-5)


@pytest.mark.parametrize("mode", ["fast", "generate"])
@pytest.mark.parametrize("tiling", ["single", "dynamic"])
def test_synthetic_equals_the_segment_loop(tiny, synthetic, mode, tiling):
    model, processor = tiny
    kwargs = dict(mode=mode, tiling=tiling, batch_size=4, return_predictions=True, progress=False)
    if mode == "generate":
        kwargs.update(generation_config={"logits_processor": LogitsProcessorList([SlotPattern(processor)])},
                      max_new_tokens=12)
    plain = evaluate_with_segment(model, processor, synthetic, **kwargs)
    in_order = evaluate_dataset(model, processor, synthetic, num_workers=0, **kwargs)
    assert_same_results(plain, in_order)  # the same batches: the same numbers, bit for bit
    grouped = evaluate_dataset(model, processor, synthetic, num_workers=0, group_by_length=True, **kwargs)
    assert_same_results(plain, grouped, same_batches=False)
    m = plain["metrics"]
    assert m["n_no_target"] > 0 and m["U_sum"] > 0
    if mode == "generate":  # the forced answers gave both decisions, and masks from generated [SEG]s
        rejected = [p["rejected"] for p in plain["predictions"]]
        assert any(rejected) and not all(rejected)


def test_refer_layout_equals_the_segment_loop_with_workers(tiny, refer):
    """Polygon ground truth rasterised in two worker processes, images read there, 640 px images tiled there."""
    model, processor = tiny
    forcing = {"logits_processor": LogitsProcessorList([SlotPattern(processor)])}
    for mode, tiling, predictions in (("fast", "single", True), ("fast", "dynamic", False),
                                      ("generate", "single", False)):
        kwargs = dict(mode=mode, tiling=tiling, batch_size=3, return_predictions=predictions, progress=False)
        if mode == "generate":
            kwargs.update(generation_config=forcing, max_new_tokens=12)
        plain = evaluate_with_segment(model, processor, refer, **kwargs)
        ours = evaluate_dataset(model, processor, refer, num_workers=2, **kwargs)
        assert_same_results(plain, ours)
        assert plain["metrics"]["n_rec"] == plain["metrics"]["n_expressions"] > 0
    limited = evaluate_dataset(model, processor, refer, limit=2, num_workers=1, batch_size=2, progress=False)
    assert limited["num_samples"] == 2
    assert limited["metrics"]["n_images"] == 2


def test_batches_group_by_tiles_and_keep_every_sample(tiny):
    """Mixed image sizes under dynamic tiling: grouped batches hold one tile count each (where the counts allow),
    cover every sample once, and pad less than batches in dataset order."""
    model, processor = tiny
    sizes = [(112, 112), (480, 640), (112, 112), (240, 112), (112, 112), (480, 640), (112, 112), (240, 112)]
    samples = []
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), bool)
        mask[: h // 2, : w // 3] = True
        referents = [Referent(text="the thing" + " on the left" * (i % 3), mask=mask, box=None)]
        samples.append(ReferringSample.from_image(i, Image.new("RGB", (w, h), (i * 20, 90, 40)), referents))

    def padding(group_by_length):
        collator = EvaluationCollator(processor, "fast", "dynamic", 2, group_by_length)
        batches = list(evaluation_loader(samples, list(range(8)), collator, num_workers=0))
        assert sorted(i for b in batches for i in b.indices) == list(range(8))
        for b in batches:  # ground truth travels with its sample
            for i, gt in zip(b.indices, b.gt_masks):
                assert torch.equal(gt[0], torch.from_numpy(samples[i].referents[0].mask))
        if group_by_length:
            tiles = [processor.image_processor.get_number_of_image_patches(*sizes[i], {"tiling": "dynamic"})
                     for b in batches for i in b.indices]
            assert all(len({tiles[2 * k], tiles[2 * k + 1]}) == 1 for k in range(4))
        return sum(int((b.inputs["attention_mask"] == 0).sum()) for b in batches)

    assert padding(True) < padding(False)


def test_device_counts_equal_the_cpu_metrics(tiny):
    """`batch_counts` on made-up logits: I, U, |gt| and the predicted box equal numpy's counts and `box_from_mask`
    (empty masks included), rejected slots keep their slot mask for scoring but return an empty mask."""
    _, processor = tiny
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 28, 28, generator=g) * 4, torch.randn(2, 28, 56, generator=g) * 4]
    logits[0][1] = -20.0  # an empty prediction
    sizes = torch.tensor([[50, 37], [31, 90]])
    gt = [torch.rand(3, 50, 37, generator=g) > 0.6, torch.rand(2, 31, 90, generator=g) > 0.3]
    gt[0][2] = False  # an empty ground truth
    rejected = torch.tensor([False, False, True, True, False])
    out = batch_counts(processor, logits, sizes, gt, rejected, torch.rand(5, generator=g), keep_masks=True)
    row = 0
    for b in range(2):
        _, slot = processor.post_process_masks(logits[b], sizes[b])
        g_np, p_np = gt[b].numpy(), slot.numpy()
        for k in range(len(gt[b])):
            c = out.counts[row].tolist()
            assert c[:3] == [int((g_np[k] & p_np[k]).sum()), int((g_np[k] | p_np[k]).sum()), int(g_np[k].sum())]
            assert c[3:7] == box_from_mask(p_np[k]).tolist() and c[7] == int(rejected[row])
            assert torch.equal(out.masks[b][k], slot[k] & ~rejected[row])
            row += 1
    assert out.counts[1, 3:7].tolist() == [0, 0, 0, 0]
    masks = torch.rand(6, 9, 11, generator=g) > 0.97
    masks[4] = False
    assert mask_boxes(masks).tolist() == box_from_mask(masks.numpy()).astype(int).tolist()


def test_bad_arguments_are_one_line_errors(tiny, synthetic):
    model, processor = tiny
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        evaluate_dataset(model, processor, synthetic, num_workers=-1, progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate_dataset(model, processor, synthetic, mode="beam", progress=False)
    sample = synthetic[0]
    sample.referents[0].mask = sample.referents[0].mask[:-1]
    with pytest.raises(ValueError, match=r"referent 0: mask is \(111, 112\), expected \(112, 112\)"):
        evaluate_dataset(model, processor, [sample], num_workers=0, progress=False)
    assert 0 <= default_num_workers() <= 4 and default_num_workers(num_processes=10**6) == 0
    assert pickle.loads(pickle.dumps(EvaluationCollator(processor, "fast", None, 2))).batch_size == 2


def test_per_expression_mode_scores_each_expression_as_its_own_call(tiny, synthetic):
    """`evaluate_dataset(mode="per_expression")` (run through `segment`'s cached-prefix mode) gives the metrics of
    one single-expression `segment` call per expression, scored by hand."""
    from mllmseg.evaluation.metrics import ReferringMetrics, compute_metrics

    model, processor = tiny
    ours = evaluate_dataset(model, processor, synthetic, mode="per_expression", progress=False)["metrics"]
    by_hand = ReferringMetrics()
    with torch.inference_mode():
        for sample in synthetic:
            for referent in sample.referents:
                result = model.segment(processor, sample.image, [referent.text], mode="fast")
                by_hand.add(sample.image_id, referent.mask, (result.probabilities[0] >= 0.5).numpy(),
                            gt_box=referent.box, pred_rejected=bool(result.rejected[0]), no_target=referent.no_target)
    expected = compute_metrics(by_hand.state_dict())
    assert ours["n_expressions"] == expected["n_expressions"] > len(synthetic)
    for key, value in expected.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert ours[key] == value, key
