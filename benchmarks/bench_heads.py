"""DSFF vs SELF1E mask heads at equal budget on the synthetic dataset (issue 8).

Both heads train from the same tiny recipe (`tiny.yaml`; `tiny_self1e.yaml` is it plus `mask_head: self1e`), the
same seed, data stream and number of steps; then each is evaluated on the same held-out synthetic split
(`evaluate_dataset`, fast mode) and its `segment` latency per image is timed (interleaved, CPU time of this process,
single-threaded, see `_common.py`).

    .venv/bin/python benchmarks/bench_heads.py --steps 300 --eval-images 64

Prints a markdown table (and writes it with `--out`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import WALL, interleaved, machine  # noqa: E402  (puts the repo on sys.path)


def train(recipe_name: str, steps: int, batch: int, out: Path, seed: int):
    from mllmseg.training.recipes import load_recipe
    from mllmseg.training.trainer import run_training

    overrides = [f"seed={seed}", "training.save_strategy=no", f"training.max_steps={steps}",
                 f"training.per_device_train_batch_size={batch}", f"training.logging_steps={max(1, steps // 5)}",
                 f"training.warmup_steps={max(1, steps // 20)}"]
    recipe = load_recipe(recipe_name, overrides)
    start = time.perf_counter()
    result = run_training(recipe, output_dir=str(out / recipe_name), resume=False)
    seconds = time.perf_counter() - start
    trainer = result["trainer"]
    model = trainer.model.eval()
    data = {k: v for k, v in dict(recipe["data"]["train"]).items() if k not in ("type", "num_images", "split", "seed")}
    for key in ("image_size", "size_range"):
        if key in data:
            data[key] = tuple(data[key])
    return model, result["processor"], result["train_loss"], seconds, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/bench_heads")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()

    import torch

    from mllmseg.data.synthetic import SyntheticReferringDataset
    from mllmseg.evaluation.evaluate import evaluate_dataset

    work = Path(args.workdir)
    rows, models = {}, {}
    for head, recipe in (("dsff", "tiny"), ("self1e", "tiny_self1e")):
        model, processor, train_loss, seconds, data = train(recipe, args.steps, args.batch, work, args.seed)
        assert model.config.mask_head == head
        held_out = SyntheticReferringDataset(args.eval_images, seed=args.seed, split="validation", **data)
        with torch.inference_mode():
            metrics = evaluate_dataset(model, processor, held_out, mode="fast", batch_size=8, progress=False)["metrics"]
        rows[head] = {
            "train_loss": train_loss,
            "train_s": seconds,
            "head_params": sum(p.numel() for p in model.mask_decoder.parameters()),
            **{k: metrics[k] for k in ("cIoU", "gIoU_per_expression", "gIoU_per_image", "N-acc", "T-acc")},
        }
        models[head] = (model, processor, held_out)
        print(head, json.dumps(rows[head]), flush=True)

    # segment latency per image: the same held-out images through each model, interleaved, single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    samples = [models["dsff"][2][i] for i in range(8)]

    def run(head):
        model, processor, _ = models[head]
        with torch.inference_mode():
            model.segment(processor, [s.image for s in samples], [[r.text for r in s.referents] for s in samples])

    times = interleaved({h: (lambda h=h: run(h)) for h in models}, repeats=args.latency_repeats)
    torch.set_num_threads(threads)
    for head in models:
        rows[head]["latency_ms"] = 1000 * statistics.median(times[head]) / len(samples)
        rows[head]["latency_wall_ms"] = 1000 * statistics.median(WALL[head]) / len(samples)
    ratios = [s / d for s, d in zip(times["self1e"], times["dsff"])]

    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else f"{v:,}")  # noqa: E731
    lines = [
        f"Machine: {machine()}",
        f"Budget: {args.steps} steps x batch {args.batch} each (same recipe, seed {args.seed}, data stream); "
        f"held-out: {args.eval_images} synthetic validation images; latency: `segment` fast mode, 8 images per "
        f"call, single-threaded CPU time per image, median of {args.latency_repeats}.",
        "",
        "| head | head params | mean train loss* | train s | cIoU | gIoU (expr) | gIoU (image) | N-acc | T-acc "
        "| segment ms / image (CPU) | wall ms / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for head, r in rows.items():
        lines.append(
            f"| {head} | {r['head_params']:,} | {r['train_loss']:.3f} | {r['train_s']:.0f} | {fmt(r['cIoU'])} | "
            f"{fmt(r['gIoU_per_expression'])} | {fmt(r['gIoU_per_image'])} | {fmt(r['N-acc'])} | {fmt(r['T-acc'])} | "
            f"{r['latency_ms']:.1f} | {r['latency_wall_ms']:.1f} |"
        )
    lines += [
        "",
        "*mean over the run (Trainer's training_loss); SELF1E's includes its low-resolution auxiliary mask term, so the "
        "two are not comparable.",
        f"Latency ratio self1e / dsff: {statistics.median(ratios):.2f} (per-repeat range "
        f"{min(ratios):.2f}-{max(ratios):.2f}); head-parameter ratio self1e / dsff: "
        f"{rows['self1e']['head_params'] / rows['dsff']['head_params']:.2f}.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
