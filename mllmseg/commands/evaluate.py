"""`mllmseg evaluate`: score a checkpoint on a referring-segmentation split (data-parallel under accelerate)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DATASETS = ("synthetic", "refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")
SKIPPED_EXAMPLES = 20  # messages of skipped records kept in the results JSON (the count is always there)


def register(subparsers) -> None:
    from ..loading import DTYPES, add_runtime_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint (cIoU, both gIoU conventions, Prec@0.5, N-acc/T-acc)",
        description="Evaluate MODEL_DIR (loaded with AutoModel/AutoProcessor, trust_remote_code=True). Runs "
        "data-parallel under `accelerate launch --num_processes N -m mllmseg evaluate ...` (GPUs) or "
        "`torchrun --nproc_per_node N -m mllmseg evaluate ...` (GPUs or CPU, gloo); results are written by the main "
        "process only and equal a single-process run.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder, LoRA adapter folder (<run>/final "
                        "of a LoRA run) or Hub id, if reachable")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-root", help="folder with <dataset>/refs(...).p|json and instances.json")
    parser.add_argument("--image-root", help="folder the image paths are relative to (default: --data-root)")
    parser.add_argument("--image-template", help="image path under --image-root, with {image_id} / {file_name} "
                        "(default: images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg; RefCLEF: "
                        "images/saiapr_tc-12/{file_name})")
    parser.add_argument("--split", help="split to evaluate (default: val; synthetic: validation)")
    parser.add_argument("--split-by", help="annotation partition (unc, umd, google, berkeley); default per dataset")
    parser.add_argument("--mode", choices=("fast", "per_expression", "generate"), default="fast",
                        help="fast: teacher-forced (paper protocol); per_expression: each expression in its own "
                        "conversation (model.segment's loop, no loader workers); generate: free decoding")
    parser.add_argument("--limit", type=int, help="evaluate the first N samples (images) only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, help="DataLoader workers per process preparing batches (images, "
                        "ground truth, tiling) while the model runs; 0: in the main process (default: up to 4, one "
                        "CPU left to each process)")
    parser.add_argument("--tiling", choices=("single", "dynamic"), help="default: the checkpoint's seg_tiling")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--output-dir", default="eval_results", help="where results go (default: ./eval_results)")
    add_runtime_arguments(parser)
    parser.add_argument("--predictions", action="store_true", help="also write per-expression predictions (JSONL, RLE)")
    parser.add_argument("--num-images", type=int, default=16, help="synthetic: number of images")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    parser.add_argument("--scenes", default="tiny", metavar="RECIPE",
                        help="synthetic: the recipe whose scenes to draw (default tiny, the from-scratch quickstart's; "
                        "tiny_base for the shipped pretrained base and the quickstart's fine-tuned model)")
    parser.add_argument("--image-size", type=int, help="synthetic: square image side (default: the --scenes recipe's)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="leave out annotation records that cannot be used (counted and written to the results) "
                        "instead of stopping at the first; the metrics then cover the remaining expressions only")
    parser.set_defaults(func=run)


def build_dataset(args):
    if args.dataset == "synthetic":
        from ..data.synthetic import SyntheticReferringDataset

        from ..training.recipes import synthetic_scene_kwargs

        kwargs = synthetic_scene_kwargs(args.scenes)  # what that recipe trains on, drawn from a held-out split
        if args.image_size:
            kwargs["image_size"] = (args.image_size, args.image_size)
        split = args.split or "validation"
        return SyntheticReferringDataset(args.num_images, seed=args.seed, split=split, **kwargs), split
    if not args.data_root:
        raise ValueError(f"--data-root is required for --dataset {args.dataset}")
    from ..data.refer import GRefCOCODataset, ReferDataset

    split = args.split or "val"
    on_bad_record = "skip" if args.skip_bad_records else "error"
    if args.dataset == "grefcoco":
        kwargs = {"split_by": args.split_by} if args.split_by else {}
        return GRefCOCODataset(args.data_root, split=split, image_root=args.image_root,
                               image_template=args.image_template, on_bad_record=on_bad_record, **kwargs), split
    return ReferDataset(args.data_root, args.dataset, split_by=args.split_by, split=split, image_root=args.image_root,
                        image_template=args.image_template, on_bad_record=on_bad_record), split


def output_stem(dataset: str, split: str, mode: str) -> str:
    return f"{dataset}_{split}_{mode}".replace("/", "-")


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    from ..loading import apply_runtime_arguments, check_model_path

    model_dir = Path(args.model_dir)
    if not model_dir.exists() and not (args.model_dir.count("/") == 1 and not args.model_dir.startswith((".", "/"))):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    dataset, split = build_dataset(args)  # the data first: a bad annotation file is named before the model is read
    check_model_path(args.model_dir)  # a checkpoint, or a LoRA adapter folder whose base is there
    skipped = getattr(dataset, "skipped", [])
    if len(dataset) == 0:
        raise ValueError(f"{args.dataset} split {split!r} has no samples")

    import torch
    from accelerate import Accelerator

    from ..evaluation.evaluate import evaluate_dataset
    from ..hub.cards import METRICS, METRICS_NOTES, metrics_table
    from ..loading import load_model

    device = apply_runtime_arguments(args)
    # accelerate only sets up a CPU process group (gloo) when asked for the CPU: do so when there is no accelerator,
    # so `torchrun --nproc_per_node N -m mllmseg evaluate ...` is data-parallel on a CPU-only machine too.
    accelerator = Accelerator(cpu=device == "cpu" or not _has_accelerator(torch))
    if skipped and accelerator.is_main_process:
        print(f"skipped {len(skipped)} bad records (--skip-bad-records); the first: {skipped[0]}", file=sys.stderr)
    model, processor = load_model(args.model_dir, args.dtype, device=evaluation_device(args.device, device,
                                                                                       accelerator))
    start = time.perf_counter()
    with torch.inference_mode():
        out = evaluate_dataset(model, processor, dataset, mode=args.mode, limit=args.limit,
                               batch_size=args.batch_size, tiling=args.tiling, accelerator=accelerator,
                               return_predictions=args.predictions, num_workers=args.num_workers)
    elapsed = time.perf_counter() - start

    if accelerator.is_main_process:
        results = {
            "model": str(args.model_dir),
            "dataset": args.dataset,
            "split": split,
            "mode": args.mode,
            "tiling": args.tiling or getattr(model.config, "seg_tiling", None),
            "limit": args.limit,
            "num_samples": out["num_samples"],
            "skipped_records": len(skipped),
            "skipped_examples": skipped[:SKIPPED_EXAMPLES],
            "num_processes": accelerator.num_processes,
            "elapsed_s": round(elapsed, 3),
            "metrics": out["metrics"],
            "metric_labels": {key: label for key, label, _ in METRICS},
        }
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stem = output_stem(args.dataset, split, args.mode)
        by_category = out.get("metrics_by_category")  # datasets that label their expressions, e.g. synthetic
        if by_category:
            results["metrics_by_category"] = by_category
        (folder / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        table = metrics_table([results])
        if by_category:
            table += "\n\nBy expression category:\n\n" + metrics_table(
                [{**results, "split": f"{split}: {name}", "metrics": m} for name, m in by_category.items()])
        title = f"# {model_dir.name or args.model_dir}: {args.dataset} {split} ({args.mode})\n\n"
        (folder / f"{stem}.md").write_text(title + table + "\n\n" + METRICS_NOTES + "\n", encoding="utf-8")
        print(table)
        print(f"results: {folder / f'{stem}.json'} and {folder / f'{stem}.md'}")
        if args.predictions:
            with open(folder / f"{stem}_predictions.jsonl", "w", encoding="utf-8") as f:
                for prediction in out["predictions"]:
                    f.write(json.dumps(prediction, default=_jsonable) + "\n")
            print(f"predictions: {folder / f'{stem}_predictions.jsonl'} ({len(out['predictions'])} expressions)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def evaluation_device(requested: str, resolved: str, accelerator):
    """The model's device: the accelerator's (one GPU per process) unless one device was named for a
    single-process run; naming one GPU for several processes is refused (they would all share it)."""
    if ":" not in resolved:  # auto, cpu, cuda, mps: what accelerate picked for this process
        return accelerator.device
    if accelerator.num_processes > 1:
        raise ValueError(f"--device {requested} names one device, but this run has {accelerator.num_processes} "
                         "processes (each gets its own from accelerate); use --device cuda or auto")
    return resolved


def _has_accelerator(torch) -> bool:
    try:
        return bool(torch.accelerator.is_available())
    except AttributeError:  # older torch
        return torch.cuda.is_available()


def _jsonable(value):
    if isinstance(value, bytes):
        return value.decode("ascii")
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
