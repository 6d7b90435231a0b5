"""Diagnosis of a quickstart checkpoint: which expressions it grounds, and what its ViT features know.

Not a timing benchmark: it explains the quickstart's held-out numbers. On the quickstart's held-out scenes
(synthetic, seed 0, split "validation", the tiny recipe's scene settings) it prints

1. Prec@0.5 (box from the mask, SPEC section 6; on all targeted expressions together it equals the quickstart's
   and `mllmseg evaluate`'s Prec@0.5 on the same images) and mean mask IoU per expression kind, with single-target
   attribute expressions split by what they name: colour only ("the red shape"), shape only ("the circle"),
   colour and shape ("the red circle");
2. held-out accuracy of linear probes (least squares on one-hot targets) that read the shape and the colour of the
   object under a ViT patch from that patch's last-layer feature (`T_img^1`), for patches at least 30% covered by
   one object, fitted on two thirds of the images and scored on the rest, next to the majority-class rate;
3. whether the `[SEG]` state follows the expression: for each colour that exactly two shapes of an image share
   (centres at least the dataset's position margin apart), "the leftmost C shape" and "the rightmost C shape" go
   through one `segment` call, and the cosine of their two `[SEG]` embeddings (the decoder's input) and the IoU of
   their two masks are averaged; the same for two colours that one shape each has ("the C1 shape", "the C2
   shape"), which name different shapes by colour alone. Near 1 and 1 means the model ignores the word that
   tells the two apart.

    .venv/bin/python benchmarks/diagnose_quickstart.py mllmseg-quickstart/run/final [--images 150]
    .venv/bin/python benchmarks/diagnose_quickstart.py mllmseg/pretrained/tiny-base --scenes tiny_base
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor

from mllmseg.data.synthetic import COLORS, SHAPES, SyntheticReferringDataset
from mllmseg.evaluation.metrics import ReferringMetrics
from mllmseg.quickstart import attribute_kind
from mllmseg.training.recipes import synthetic_scene_kwargs


def expression_kind(category: str, text: str) -> str:
    """`attribute: colour` / `attribute: shape` / `attribute: colour + shape`, or the category itself."""
    kind = attribute_kind(text, category)
    return kind if category != "attribute" else f"attribute: {kind}"


def probe_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    design = lambda x: np.c_[x, np.ones(len(x))]  # noqa: E731
    weights = np.linalg.lstsq(design(train_x), np.eye(classes)[train_y], rcond=1e-4)[0]
    return float((design(test_x) @ weights).argmax(1).__eq__(test_y).mean())


def expression_pairs(scene, position_margin: float, width: int) -> dict[str, tuple[str, str]]:
    """At most one pair of expressions per test of `[SEG]` contrast (see the module docstring) for one scene."""
    members = collections.defaultdict(list)
    for obj in scene.objects:
        members[obj.color].append(obj)
    pairs = {}
    for colour, group in members.items():
        if len(group) == 2 and abs(group[0].cx - group[1].cx) >= position_margin * width:
            pairs["direction"] = (f"the leftmost {colour} shape", f"the rightmost {colour} shape")
            break
    single = [colour for colour, group in members.items() if len(group) == 1]
    if len(single) >= 2:
        pairs["colour"] = (f"the {single[0]} shape", f"the {single[1]} shape")
    return pairs


def seg_contrast(model, processor, image, pair: tuple[str, str], captured: dict) -> tuple[float, float] | None:
    """(cosine of the two `[SEG]` embeddings, IoU of the two masks) for two expressions about one image."""
    captured.pop("seg", None)
    result = model.segment(processor, image, list(pair))
    seg = captured.get("seg")
    if seg is None or seg.shape[0] != 2:
        return None
    seg = seg.float()
    a, b = (result.probabilities[k] >= 0.5 for k in range(2))
    union = int((a | b).sum())
    return float(F.cosine_similarity(seg[0], seg[1], dim=0)), (int((a & b).sum()) / union if union else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--scenes", default="tiny", help="the recipe whose scenes to draw (tiny_base: the shipped base)")
    args = parser.parse_args()

    data = SyntheticReferringDataset(args.images, seed=0, split="validation", **synthetic_scene_kwargs(args.scenes))
    model = AutoModel.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    captured = {}  # hook outputs of the latest forward: ViT states, the decoder's [SEG] embeddings
    model.model.vision_tower.register_forward_hook(lambda m, i, o: captured.__setitem__("vit", o.last_hidden_state))
    # The decoder's [SEG] embeddings `(num_seg, T)` of the latest `segment` call.
    model.mask_decoder.text_down.register_forward_hook(lambda m, i, o: captured.__setitem__("seg", i[0]))
    grid = model.config.vision_grid  # ViT patches per tile side
    patch = model.config.image_size // grid

    by_kind, everything = collections.defaultdict(ReferringMetrics), ReferringMetrics()  # scored as evaluate does
    features, shapes, colours, image_of = [], [], [], []
    contrast = collections.defaultdict(list)
    with torch.inference_mode():
        for i in range(len(data)):
            sample, scene = data[i], data.scene(i)
            result = model.segment(processor, sample.image, [r.text for r in sample.referents])
            for j, (referent, expression) in enumerate(zip(sample.referents, scene.expressions)):
                if referent.no_target:
                    continue
                # The mask of the expression's [SEG] slot even where [REJ] won, as `mllmseg evaluate` scores it.
                pred = (result.probabilities[j] >= 0.5).numpy()
                for metrics in (by_kind[expression_kind(expression.category, expression.text)], everything):
                    metrics.add(i, referent.mask, pred, gt_box=referent.box, no_target=False)
            # One tile per image (single tiling, square images): row-major patches after the CLS token.
            tokens = captured["vit"][0, 1:].float().numpy()
            by_label = {o.label: o for o in scene.objects}
            for cell in range(grid * grid):
                r, c = divmod(cell, grid)
                labels = scene.labels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                values, counts = np.unique(labels[labels > 0], return_counts=True)
                if len(values) and counts.max() >= 0.3 * patch * patch:
                    obj = by_label[int(values[counts.argmax()])]
                    features.append(tokens[cell])
                    shapes.append(SHAPES.index(obj.shape))
                    colours.append(list(COLORS).index(obj.color))
                    image_of.append(i)
            for test, pair in expression_pairs(scene, data.position_margin, data.image_size[1]).items():
                measured = seg_contrast(model, processor, sample.image, pair, captured)
                if measured is not None:
                    contrast[test].append(measured)

    print(f"{args.checkpoint}: {len(data)} held-out images")
    print(f"{'expression kind':28s} {'n':>4s} {'Prec@0.5':>9s} {'mean IoU':>9s}")
    for kind in sorted(by_kind):
        m = by_kind[kind].compute()
        print(f"{kind:28s} {m['n_rec']:4d} {m['prec@0.5']:9.3f} {m['gIoU_per_expression']:9.3f}")
    total = everything.compute()
    print(f"{'all targeted':28s} {total['n_rec']:4d} {total['prec@0.5']:9.3f}")

    features, image_of = np.asarray(features), np.asarray(image_of)
    train = image_of < (2 * len(data)) // 3
    for name, target, classes in (("shape", np.asarray(shapes), len(SHAPES)), ("colour", np.asarray(colours), len(COLORS))):
        accuracy = probe_accuracy(features[train], target[train], features[~train], target[~train], classes)
        majority = np.bincount(target[~train], minlength=classes).max() / (~train).sum()
        print(f"linear probe, ViT patch feature -> {name}: held-out accuracy {accuracy:.3f} "
              f"(majority class {majority:.3f}; {train.sum()} / {(~train).sum()} patches)")
    examples = {"direction": "'the leftmost C shape' vs 'the rightmost C shape'",
                "colour": "'the C1 shape' vs 'the C2 shape'"}
    for test, example in examples.items():
        values = np.asarray(contrast[test]).reshape(-1, 2)
        if len(values):
            print(f"[SEG] contrast, {test}: {example}: {len(values)} pairs, [SEG] cosine {values[:, 0].mean():.3f}, "
                  f"mask IoU {values[:, 1].mean():.3f}")


if __name__ == "__main__":
    main()
