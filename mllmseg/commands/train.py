"""`mllmseg train RECIPE [key=value ...]` and `mllmseg merge-lora ADAPTER_DIR OUT_DIR`.

`train` runs on one process or data-parallel: `accelerate launch [--num_processes N] -m mllmseg train RECIPE` or
`torchrun --nproc_per_node N -m mllmseg train RECIPE`.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..loading import DTYPES

    parser = subparsers.add_parser(
        "train",
        help="train from a recipe (built-in name or YAML path), with key=value overrides",
        description="Train MLLMSeg from a recipe. Built-in recipes: tiny, res_8b, gres_8b. Overrides use dotted keys, "
        "e.g. training.max_steps=100 model.internvl=/models/InternVL2_5-8B-hf. Resumes from the last checkpoint of "
        "the output folder when there is one (--no-resume starts over).",
    )
    parser.add_argument("recipe", help="recipe name (mllmseg/recipes/NAME.yaml) or path to a YAML file")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value overrides (dotted keys, YAML values)")
    parser.add_argument("--output-dir", default=None, help="overrides the recipe's output_dir")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="resume from the last checkpoint (the default when one exists)")
    resume.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if checkpoints exist")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="leave out annotation records that cannot be used (counted, logged and written to "
                        "train_summary.json) instead of stopping at the first (= data.on_bad_record=skip)")
    parser.set_defaults(func=run_train)

    merge = subparsers.add_parser(
        "merge-lora",
        help="merge a LoRA adapter into its base model: a plain remote-code checkpoint",
        description="Merge ADAPTER_DIR (a `mllmseg train` LoRA output, e.g. <run>/final or <run>/checkpoint-N) into "
        "its base model and write model + processor to OUT_DIR. The base is the adapter config's "
        "base_model_name_or_path: a folder (absolute, or relative to ADAPTER_DIR, as `mllmseg train` stores a base "
        "inside the run folder) or a Hub id.",
        epilog="example: mllmseg merge-lora runs/res/final runs/res/merged --dtype bfloat16",
    )
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR")
    merge.add_argument("out_dir", metavar="OUT_DIR")
    merge.add_argument("--base", default=None, help="base model folder (default: the adapter config's)")
    merge.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="dtype of the merged weights (default auto: the base checkpoint's)")
    merge.set_defaults(func=run_merge)


def run_train(args) -> int:
    import yaml

    from ..training.recipes import load_recipe
    from ..training.trainer import run_training

    # Options may also follow the recipe (argparse stops at the first positional of a REMAINDER).
    late = argparse.ArgumentParser(prog="mllmseg train", add_help=False)
    late.add_argument("--output-dir", default=args.output_dir)
    late.add_argument("--resume", dest="resume", action="store_true", default=args.resume)
    late.add_argument("--no-resume", dest="resume", action="store_false")
    late.add_argument("--print-recipe", action="store_true", default=args.print_recipe)
    late.add_argument("--skip-bad-records", action="store_true", default=args.skip_bad_records)
    late_args, overrides = late.parse_known_args(args.overrides)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ValueError(f"unknown option(s) {bad}")
    args.output_dir, args.resume, args.print_recipe = late_args.output_dir, late_args.resume, late_args.print_recipe
    if late_args.skip_bad_records:
        overrides = [*overrides, "data.on_bad_record=skip"]
    recipe = load_recipe(args.recipe, overrides)
    if args.print_recipe:
        print(yaml.safe_dump(recipe, sort_keys=False))
        return 0
    result = run_training(recipe, output_dir=args.output_dir, resume=args.resume)
    if result["trainer"].is_world_process_zero():
        loss = "n/a" if result["train_loss"] is None else f"{result['train_loss']:.4f}"
        print(f"done: {result['global_step']} steps, train loss {loss} (mean over the whole run); final weights in "
              f"{result['final']}")
    return 0


def run_merge(args) -> int:
    from ..training.merge import merge_adapter_checkpoint

    out = merge_adapter_checkpoint(args.adapter_dir, args.out_dir, base=args.base, dtype=args.dtype)
    print(f"merged {args.adapter_dir} into {out} ({args.dtype if args.dtype != 'auto' else 'the base dtype'})")
    return 0
