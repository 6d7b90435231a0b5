"""`mllmseg quickstart`: the pretrained tiny MLLMSeg that ships with the package, then the product path at tiny size
(CPU, offline, a few minutes), in four steps:

1. load the shipped checkpoint (`AutoModel` / `AutoProcessor`, `trust_remote_code=True`), segment held-out scenes,
   print metrics by category, write overlays;
2. fine-tune it with LoRA (the `tiny_lora` recipe) on a colour it has never seen, from a rows folder written to disk
   (the format of your own data: images, mask PNGs, `metadata.jsonl`);
3. evaluate before / after on the new concept and on the old ones;
4. merge the adapter into a remote-code checkpoint, reload it in a fresh process, segment, and build + verify a
   release folder (the dry run of `mllmseg release`).

`--from-scratch` runs the first quickstart instead: the `tiny` recipe trained from random weights (about 8 minutes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="segment with the shipped tiny MLLMSeg, fine-tune it with LoRA on a new colour, merge, reload, release "
             "dry run (CPU, offline, a few minutes)",
        description="Loads the pretrained tiny MLLMSeg that ships with the package and scores it on held-out "
        "synthetic scenes; writes a rows folder of scenes with a colour it has never seen and fine-tunes it with "
        "LoRA on them; scores it before and after on that colour and on the old concepts; merges the adapter, "
        "reloads the merged checkpoint in a fresh process and builds a verified release folder. --from-scratch "
        "trains the tiny recipe from random weights instead (the first quickstart).",
    )
    parser.add_argument("--output-dir", default="mllmseg-quickstart", help="where every output goes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fine-tune (and of --from-scratch)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the tiny_lora recipe's 600; with --from-scratch the tiny recipe's)")
    parser.add_argument("--eval-images", type=int, default=100, help="held-out scenes of the old concepts")
    parser.add_argument("--concept-images", type=int, default=50, help="held-out scenes of the new concept")
    parser.add_argument("--train-images", type=int, default=1000, help="scenes in the fine-tuning rows folder")
    parser.add_argument("--overlays", type=int, default=4, help="held-out scenes to draw overlays for")
    parser.add_argument("--base", default=None, help="the pretrained checkpoint to start from (default: the shipped "
                        "mllmseg/pretrained/tiny-base)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the tiny recipe from random weights instead (the first quickstart)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the tiny_lora recipe (tiny with --from-scratch), e.g. "
                             "training.learning_rate=5e-4")
    parser.set_defaults(func=run)


def truth_result(sample):
    """A sample's ground truth in the shape `draw_overlay` takes (masks, boxes, rejected = no target)."""
    from types import SimpleNamespace

    import numpy as np

    from ..data.records import box_from_mask

    masks = np.stack([r.mask for r in sample.referents]).astype(bool)
    return SimpleNamespace(masks=masks, boxes=box_from_mask(masks), scores=None,
                           rejected=np.array([r.no_target for r in sample.referents]))


def run_from_scratch(args) -> int:
    """`--from-scratch`: the first quickstart (before issue 22): train the `tiny` recipe from random weights, evaluate,
    reload, overlays (`--steps` / `--eval-images` / `--seed` / overrides of the `tiny` recipe)."""
    import torch

    from ..data.synthetic import SyntheticReferringDataset
    from ..evaluation.evaluate import evaluate_dataset
    from ..loading import load_model
    from ..training.recipes import load_recipe, synthetic_scene_kwargs
    from ..training.trainer import run_training

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
    _print_evaluation("held-out metrics", {"metrics": metrics, "metrics_by_category": by_category})

    overlay_dir = out / "overlays"
    _overlays(model, processor, held_out, args.overlays, overlay_dir, "heldout", show_decisions=True)
    elapsed = time.time() - start
    report = {"metrics": metrics, "metrics_by_category": by_category, "steps": result["global_step"], "train_loss": result["train_loss"],
              "seconds": round(elapsed, 1), "checkpoint": checkpoint, "eval_images": args.eval_images}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {overlay_dir}/ and {out / 'metrics.json'} ({elapsed:.0f} s in all)")
    return 0


# ------------------------------------------------------------------------------------------------------- pretrained

_RELOAD_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, image, expressions, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
result = model.segment(processor, Image.open(image).convert("RGB"), expressions)
np.savez(out, masks=np.asarray(result.masks), rejected=np.asarray(result.rejected))
print("MLLMSEG_RELOAD " + type(model).__module__ + "." + type(model).__name__)
"""


def _overlays(model, processor, dataset, count: int, folder: Path, prefix: str, show_decisions: bool = False) -> list[Path]:
    """`folder/<prefix>_<i>.png` for the first `count` samples: the ground truth beside the prediction, both drawn
    as `segment` and the demo draw results; `show_decisions` prints each expression's [SEG] / [REJ] against the
    truth."""
    import torch

    from ..visualize import draw_overlay, side_by_side

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.inference_mode():
        for i in range(min(count, len(dataset))):
            sample = dataset[i]
            exprs = [r.text for r in sample.referents]
            res = model.segment(processor, sample.image, exprs)
            path = folder / f"{prefix}_{i}.png"
            side_by_side([draw_overlay(sample.image, truth_result(sample), exprs), draw_overlay(sample.image, res, exprs)],
                         ["ground truth", "prediction"]).save(path)
            paths.append(path)
            if show_decisions:
                for e, r, rej in zip(exprs, sample.referents, res.rejected):
                    print(f"  {path.name}: {e!r} -> {'[REJ]' if bool(rej) else '[SEG]'} "
                          f"(truth: {'no target' if r.no_target else 'target'})")
    return paths


def _print_evaluation(title: str, evaluation: dict) -> None:
    from ..quickstart import format_metrics

    print(f"{title}: {format_metrics(evaluation['metrics'])}")
    for name, m in evaluation["metrics_by_category"].items():
        shown = format_metrics(m, ("cIoU", "gIoU_per_expression", "prec@0.5", "N-acc"))
        print(f"  {name:9s} ({m['n_expressions']:3d} expressions): {shown}")


def _reload_in_fresh_process(folder: Path, image: Path, expressions: list[str], out: Path) -> tuple[str, dict]:
    """Segment `image` with `folder` loaded by `AutoModel` / `AutoProcessor` in a new interpreter: (its model class,
    `{"masks", "rejected"}`)."""
    proc = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(folder), str(image), json.dumps(expressions),
                           str(out)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MLLMSEG_RELOAD ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"reloading {folder} in a fresh process failed: {tail[-1] if tail else proc.returncode}")
    import numpy as np

    with np.load(out) as arrays:
        return lines[-1].split(" ", 1)[1], {"masks": arrays["masks"], "rejected": arrays["rejected"]}


def run(args) -> int:
    if getattr(args, "from_scratch", False):
        return run_from_scratch(args)
    import numpy as np
    import torch

    from ..hub.release import assemble_release, verify_release
    from ..loading import load_model
    from ..training.merge import merge_adapter_checkpoint
    from ..quickstart import (NEW_CONCEPT, before_after_table, evaluate_scenes, finetune_on_concept, format_metrics,
                              heldout_scenes, tiny_base_path)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else tiny_base_path()
    concept = NEW_CONCEPT
    timings = {}

    # 1. the shipped checkpoint on held-out scenes
    start = time.time()
    print(f"[1/4] loading {base} (AutoModel / AutoProcessor, trust_remote_code=True)", flush=True)
    model, processor = load_model(str(base), cpu=True)
    old_set = heldout_scenes(args.eval_images)
    new_set = heldout_scenes(args.concept_images, concept=concept)
    before_old = evaluate_scenes(model, processor, old_set)
    _print_evaluation(f"shipped model, {len(old_set)} held-out scenes", before_old)
    overlays = _overlays(model, processor, old_set, args.overlays, out / "overlays", "base_heldout")
    print(f"overlays: {', '.join(str(p) for p in overlays)}")
    timings["1. segment held-out scenes"] = time.time() - start

    # 2. LoRA fine-tune on the new concept, from a rows folder on disk
    start = time.time()
    print("[2/4] ", end="")
    result = finetune_on_concept(base, out, processor.tokenizer, concept, seed=args.seed, train_images=args.train_images,
                                 steps=args.steps, overrides=args.overrides)
    token_ids = result["token_ids"]
    adapter = Path(result["final"])
    print(f"adapter: {adapter} ({result['global_step']} steps)")
    timings["2. LoRA fine-tune"] = time.time() - start

    # 3. before / after
    start = time.time()
    print(f"[3/4] evaluating before / after on {concept!r} and on the old concepts", flush=True)
    before_new = evaluate_scenes(model, processor, new_set)
    del model
    tuned, tuned_processor = load_model(str(adapter), cpu=True)
    after_old = evaluate_scenes(tuned, tuned_processor, old_set)
    after_new = evaluate_scenes(tuned, tuned_processor, new_set)
    _overlays(tuned, tuned_processor, new_set, args.overlays, out / "overlays", f"finetuned_{concept}")
    for line in before_after_table(concept, before_old, after_old, before_new, after_new):
        print(line)
    timings["3. evaluate before / after"] = time.time() - start

    # 4. merge, reload in a fresh process, release dry run
    start = time.time()
    final = merge_adapter_checkpoint(adapter, out / "final")
    print(f"[4/4] merged {adapter} into {final}; reloading it in a fresh process", flush=True)
    sample = new_set[0]
    image_path = out / "overlays" / "reload_input.png"
    sample.image.save(image_path)
    exprs = [r.text for r in sample.referents]
    model_class, reloaded = _reload_in_fresh_process(final, image_path, exprs, out / "overlays" / "reload_result.npz")
    with torch.inference_mode():
        here = tuned.segment(tuned_processor, sample.image, exprs)
    same = np.array_equal(reloaded["masks"], np.asarray(here.masks)) and np.array_equal(
        reloaded["rejected"], np.asarray(here.rejected))
    print(f"fresh process: {model_class}; masks {'equal to' if same else 'DIFFERENT FROM'} the in-memory model's")
    if not same:
        raise RuntimeError(f"the merged checkpoint {final} segments differently in a fresh process")
    evaluation_files = []
    for name, evaluation in (("synthetic", after_old), (f"synthetic-{concept}", after_new)):
        record = {"dataset": name, "split": "validation", **evaluation}
        (out / f"eval_{name}.json").write_text(json.dumps(record, indent=2))
        evaluation_files.append(record)
    release = out / "release"
    shutil.rmtree(release, ignore_errors=True)
    run_summary = adapter.parent / "train_summary.json"  # mllmseg train writes <run>/train_summary.json
    report = assemble_release(final, release, "your-name/mllmseg-tiny-" + concept, eval_results=evaluation_files,
                              training_summary=run_summary if run_summary.is_file() else None)
    verified = verify_release(report.folder)
    print(f"release dry run: {report.folder} ({len(report.files)} files), verified: {verified['model_class']} loads "
          "from the folder alone")
    timings["4. merge, reload, release dry run"] = time.time() - start

    summary = {"before": {"old": before_old, "new": before_new}, "after": {"old": after_old, "new": after_new},
               "concept": concept, "token_ids": token_ids, "steps": result["global_step"], "base": str(base),
               "final": str(final), "release": str(report.folder),
               "seconds": {k: round(v, 1) for k, v in timings.items()}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print()
    print("| step | seconds | result |")
    print("|---|---:|---|")
    results = [f"old concepts: {format_metrics(before_old['metrics'], ('cIoU', 'prec@0.5', 'N-acc'))}",
               f"{result['global_step']} steps, adapter {adapter}",
               f"{concept}: cIoU {before_new['metrics']['cIoU']:.3f} -> {after_new['metrics']['cIoU']:.3f}; old: cIoU "
               f"{before_old['metrics']['cIoU']:.3f} -> {after_old['metrics']['cIoU']:.3f}",
               f"{final} reloaded in a fresh process; {report.folder} verified"]
    for (step, seconds), text in zip(timings.items(), results):
        print(f"| {step} | {seconds:.0f} | {text} |")
    print(f"| total | {sum(timings.values()):.0f} | metrics in {out / 'metrics.json'} |")
    return 0
