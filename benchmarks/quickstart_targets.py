"""The quickstart's targets (issue 22), measured on held-out scenes: the shipped tiny base (cIoU, Prec@0.5, N-acc,
overall and per category), `segment` latency on one synthetic image, and the LoRA fine-tune on the new concept with
the quickstart's default settings for each seed (before / after on the new concept and on the old categories).

    .venv/bin/python benchmarks/quickstart_targets.py              # 200 + 100 held-out scenes, seeds 0 and 1
    .venv/bin/python benchmarks/quickstart_targets.py --quick      # 40 + 20 scenes, seed 0, 60 fine-tune steps

Targets (issue 22): base cIoU >= 0.80, Prec@0.5 >= 0.80, N-acc >= 0.85, no category under Prec@0.5 0.6; the
fine-tune lifts the new concept from near zero to cIoU >= 0.70 while no old category loses more than 0.03 cIoU;
`segment` on one synthetic image under 0.2 s. Not a timed test: the numbers are printed (and in RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _check(name: str, value: float, target: float, above: bool = True) -> str:
    ok = value >= target if above else value <= target
    return f"{name} {value:.3f} ({'>=' if above else '<='} {target}: {'met' if ok else 'NOT met'})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None, help="held-out scenes of the old concepts (200)")
    parser.add_argument("--concept-images", type=int, default=None, help="held-out scenes of the new concept (100)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tune seeds (0 1)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps (the quickstart's default)")
    args = parser.parse_args(argv)
    images = args.images or (40 if args.quick else 200)
    concept_images = args.concept_images or (20 if args.quick else 100)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    steps = args.steps or (60 if args.quick else None)

    import torch

    from mllmseg.loading import load_model
    from mllmseg.quickstart import (NEW_CONCEPT, before_after_table, evaluate_scenes, finetune_on_concept,
                                    format_metrics, heldout_scenes, tiny_base_path)

    print(f"torch threads: {torch.get_num_threads()}")
    base = tiny_base_path()
    model, processor = load_model(str(base), cpu=True)
    old_set = heldout_scenes(images)
    new_set = heldout_scenes(concept_images, concept=NEW_CONCEPT)
    start = time.perf_counter()
    before_old = evaluate_scenes(model, processor, old_set, progress=False)
    took = time.perf_counter() - start
    m = before_old["metrics"]
    print(f"\n== shipped base, {images} held-out scenes ({m['n_expressions']} expressions, {took:.0f} s) ==")
    print(format_metrics(m))
    categories = before_old["metrics_by_category"]
    for name, c in categories.items():
        print(f"  {name:15s} n={c['n_expressions']:4d}  {format_metrics(c, ('cIoU', 'prec@0.5', 'N-acc'))}")
    worst = min((c["prec@0.5"], name) for name, c in categories.items() if isinstance(c.get("prec@0.5"), float))
    print("targets: " + "; ".join([_check("cIoU", m["cIoU"], 0.80), _check("Prec@0.5", m["prec@0.5"], 0.80),
                                    _check("N-acc", m["N-acc"], 0.85),
                                    _check(f"lowest category Prec@0.5 ({worst[1]})", worst[0], 0.6)]))

    # segment latency: one synthetic scene, its expressions, in this process
    sample = old_set[0]
    exprs = [r.text for r in sample.referents]
    with torch.inference_mode():
        for _ in range(2):
            model.segment(processor, sample.image, exprs)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            model.segment(processor, sample.image, exprs)
            times.append(time.perf_counter() - t)
    latency = statistics.median(times)
    print(f"\nsegment, one {sample.width}x{sample.height} scene, {len(exprs)} expressions: median {latency * 1000:.0f} ms "
          f"of 10 (min {min(times) * 1000:.0f}); " + _check("seconds", latency, 0.2, above=False))

    before_new = evaluate_scenes(model, processor, new_set, progress=False)
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="mllmseg-qs-bench-") as tmp:
            start = time.perf_counter()
            run = finetune_on_concept(base, tmp, processor.tokenizer, seed=seed, steps=steps, progress=False,
                                      overrides=["training.disable_tqdm=true"])
            took = time.perf_counter() - start
            tuned, tuned_processor = load_model(run["final"], cpu=True)
            after_old = evaluate_scenes(tuned, tuned_processor, old_set, progress=False)
            after_new = evaluate_scenes(tuned, tuned_processor, new_set, progress=False)
        print(f"\n== fine-tune on {NEW_CONCEPT!r}, seed {seed}: {run['global_step']} steps in {took:.0f} s "
              f"(rows folder written and trained) ==")
        for line in before_after_table(NEW_CONCEPT, before_old, after_old, before_new, after_new):
            print(line)
        losses = {name: before_old["metrics_by_category"][name]["cIoU"] - c["cIoU"]
                  for name, c in after_old["metrics_by_category"].items()
                  if isinstance(c.get("cIoU"), float) and name != "no_target"}
        worst_loss = max(losses.items(), key=lambda kv: kv[1])
        new_after = after_new["metrics"]["cIoU"]
        print("targets: " + "; ".join([_check(f"{NEW_CONCEPT} cIoU", new_after, 0.70),
                                        _check(f"largest old-category cIoU loss ({worst_loss[0]})", worst_loss[1],
                                               0.03, above=False)]))
        results.append((seed, new_after, worst_loss[1], after_old["metrics"]["cIoU"], took))

    print(f"\nRESULT quickstart base: cIoU {m['cIoU']:.3f}, Prec@0.5 {m['prec@0.5']:.3f}, N-acc {m['N-acc']:.3f}, "
          f"lowest category Prec@0.5 {worst[0]:.3f} ({worst[1]}); segment {latency * 1000:.0f} ms")
    for seed, new_after, loss, old_after, took in results:
        print(f"RESULT quickstart fine-tune seed {seed}: {NEW_CONCEPT} cIoU {before_new['metrics']['cIoU']:.3f} -> "
              f"{new_after:.3f}; old cIoU {m['cIoU']:.3f} -> {old_after:.3f} (largest category loss {loss:+.3f}); "
              f"{took:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
