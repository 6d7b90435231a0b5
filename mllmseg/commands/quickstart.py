"""`mllmseg quickstart`: train a tiny MLLMSeg model on synthetic shapes (CPU, offline, minutes), evaluate it on
held-out images, save it as a remote-code checkpoint, reload it through `AutoModel` / `AutoProcessor` with
`trust_remote_code=True`, and write mask overlays plus a metrics JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train, evaluate, save, reload and run a tiny MLLMSeg model (CPU, offline, about 10 minutes)",
        description="Trains the `tiny` recipe on synthetic shapes, evaluates on held-out images (cIoU, gIoU, N-acc, "
        "Prec@0.5), saves a remote-code checkpoint, reloads it with trust_remote_code=True and writes overlays.",
    )
    parser.add_argument("--output-dir", default="mllmseg-quickstart", help="where the checkpoint and outputs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny recipe's)")
    parser.add_argument("--eval-images", type=int, default=100, help="held-out images to evaluate on")
    parser.add_argument("--overlays", type=int, default=4, help="held-out images to write overlays for")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the tiny recipe (e.g. training.learning_rate=5e-4)")
    parser.set_defaults(func=run)


def truth_result(sample):
    """A sample's ground truth in the shape `draw_overlay` takes (masks, boxes, rejected = no target)."""
    from types import SimpleNamespace

    import numpy as np

    from ..data.records import box_from_mask

    masks = np.stack([r.mask for r in sample.referents]).astype(bool)
    return SimpleNamespace(masks=masks, boxes=box_from_mask(masks), scores=None,
                           rejected=np.array([r.no_target for r in sample.referents]))


def run(args) -> int:
    import torch

    from ..data.synthetic import SyntheticReferringDataset
    from ..evaluation.evaluate import evaluate_dataset
    from ..loading import load_model
    from ..training.recipes import load_recipe, synthetic_scene_kwargs
    from ..training.trainer import run_training
    from ..visualize import draw_overlay, side_by_side

    start = time.time()
    out = Path(args.output_dir)
    # Checkpoints every `save_steps` of the tiny recipe: a killed quickstart resumes from the last one when run again
    # with the same --output-dir (a finished run is not trained again).
    overrides = [f"seed={args.seed}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"training.max_steps={args.steps}")
    recipe = load_recipe("tiny", overrides)
    data_kwargs = synthetic_scene_kwargs(recipe)
    result = run_training(recipe, output_dir=str(out / "run"), resume=None)
    checkpoint = result["final"]
    print(f"trained {result['global_step']} steps in {time.time() - start:.0f} s; checkpoint: {checkpoint}")

    model, processor = load_model(checkpoint, cpu=True)
    print(f"reloaded {type(model).__name__} from remote code ({type(model).__module__})")

    # Held-out: the training distribution, another split (disjoint random stream).
    held_out = SyntheticReferringDataset(args.eval_images, seed=args.seed, split="validation", **data_kwargs)
    with torch.inference_mode():
        evaluation = evaluate_dataset(model, processor, held_out, mode="fast", batch_size=8)
    metrics, by_category = evaluation["metrics"], evaluation.get("metrics_by_category", {})
    keys = ("cIoU", "gIoU_per_expression", "gIoU_per_image", "prec@0.5", "N-acc", "T-acc")
    print("held-out metrics: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float)))
    for name, m in by_category.items():
        shown = ", ".join(f"{k} {m[k]:.3f}" for k in ("cIoU", "gIoU_per_expression", "prec@0.5", "N-acc")
                          if isinstance(m.get(k), float))
        print(f"  {name:9s} ({m['n_expressions']:3d} expressions): {shown}")

    overlay_dir = out / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for i in range(min(args.overlays, len(held_out))):
            sample = held_out[i]
            exprs = [r.text for r in sample.referents]
            res = model.segment(processor, sample.image, exprs)
            path = overlay_dir / f"heldout_{i}.png"
            # The ground truth beside the prediction, both drawn as `segment` and the demo draw results.
            side_by_side([draw_overlay(sample.image, truth_result(sample), exprs), draw_overlay(sample.image, res, exprs)],
                         ["ground truth", "prediction"]).save(path)
            for e, r, rej in zip(exprs, sample.referents, res.rejected):
                print(f"  {path.name}: {e!r} -> {'[REJ]' if bool(rej) else '[SEG]'} (truth: {'no target' if r.no_target else 'target'})")
    elapsed = time.time() - start
    report = {"metrics": metrics, "metrics_by_category": by_category, "steps": result["global_step"], "train_loss": result["train_loss"],
              "seconds": round(elapsed, 1), "checkpoint": checkpoint, "eval_images": args.eval_images}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {overlay_dir}/ and {out / 'metrics.json'} ({elapsed:.0f} s in all)")
    return 0
