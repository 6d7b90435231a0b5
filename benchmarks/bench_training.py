"""Benchmark 6: training throughput of the quickstart recipe, with and without gradient checkpointing.

The quickstart recipe (`mllmseg/recipes/tiny.yaml`: tiny random model, synthetic shapes, batch 8, full fine-tuning)
is built by the training code itself (`mllmseg.training.recipes.load_recipe` + `mllmseg.training.trainer.build_trainer`,
i.e. what `run_training` runs) and trained for a few steps with saving and logging off. Each run is a fresh
subprocess, so its peak RSS belongs to one configuration; the two configurations alternate (A, B, A, B, ...).
Throughput: samples per second between the end of the first step and the end of the last (the first step is
warm-up), single-threaded torch, in CPU time of the process (`time.process_time`, which other jobs on the machine
do not inflate; data loading runs in the same process, `dataloader_num_workers: 0`). Memory: the process's peak RSS (`VmHWM`), and the rise of the peak over
the resident size at the start of `trainer.train()` (the peak is reset there through `/proc/self/clear_refs`), i.e.
what training itself adds on top of the model, data and Trainer set-up.

Gradient checkpointing is the Trainer's `gradient_checkpointing: true` (non-reentrant), which calls the model's
`gradient_checkpointing_enable()`; tests/test_modeling.py checks that it gives the same gradients.

    .venv/bin/python benchmarks/bench_training.py [--quick] [--steps 30] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import machine, median, proc_status_kib, single_thread


def child(checkpointing: bool, steps: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from mllmseg.training.recipes import load_recipe
    from mllmseg.training.trainer import build_trainer

    single_thread()

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            self.rss_at_start = proc_status_kib("VmRSS")

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.process_time())

    overrides = [f"training.max_steps={steps}", "training.save_strategy=no", "training.logging_steps=1000",
                 f"training.gradient_checkpointing={str(checkpointing).lower()}", "training.report_to=none",
                 "training.disable_tqdm=true"]
    recipe = load_recipe("tiny", overrides)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        trainer, _, _ = build_trainer(recipe, output_dir=out, callbacks=[clock])
        model = trainer.model
        trainer.train()
        gc_on = bool(getattr(model.model.language_model, "gradient_checkpointing", False))
    batch = int(recipe["training"]["per_device_train_batch_size"])
    elapsed = clock.ends[-1] - clock.ends[0]
    return {"samples_per_s": (len(clock.ends) - 1) * batch / elapsed, "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
            "train_rise_mib": (proc_status_kib("VmHWM") - clock.rss_at_start) / 1024, "checkpointing_active": gc_on,
            "torch_threads": torch.get_num_threads()}


def run_child(checkpointing: bool, steps: int) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"from bench_training import child; print('RESULT_JSON ' + json.dumps(child({checkpointing}, {steps})))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT_JSON ")][-1]
    return json.loads(line[len("RESULT_JSON "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one repeat")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 2)
    single_thread()
    print(f"# 6. Training throughput, quickstart recipe (tiny.yaml), with and without gradient checkpointing\n{machine()}")
    runs = {False: [], True: []}
    for _ in range(repeats):
        for gc in (False, True):
            runs[gc].append(run_child(gc, steps))
    for gc in (False, True):
        r = runs[gc]
        assert all(x["checkpointing_active"] == gc for x in r), "gradient checkpointing state is not what was asked"
        print(f"gradient checkpointing {'on ' if gc else 'off'}: {median([x['samples_per_s'] for x in r]):6.2f} "
              f"samples/s, peak RSS {median([x['peak_rss_mib'] for x in r]):7.1f} MiB, training adds "
              f"{median([x['train_rise_mib'] for x in r]):6.1f} MiB (medians of {len(r)} runs of {steps} steps, "
              f"batch 8, {r[0]['torch_threads']} thread)")
    speed = median([x["samples_per_s"] for x in runs[True]]) / median([x["samples_per_s"] for x in runs[False]])
    rise = median([x["train_rise_mib"] for x in runs[True]]) / median([x["train_rise_mib"] for x in runs[False]])
    print(f"checkpointing on / off: throughput {speed:.2f}x, training memory rise {rise:.2f}x")
    print(f"RESULT training sps_off={median([x['samples_per_s'] for x in runs[False]]):.2f} "
          f"sps_on={median([x['samples_per_s'] for x in runs[True]]):.2f} throughput_ratio={speed:.2f} mem_rise_ratio={rise:.2f}")


if __name__ == "__main__":
    main()
