"""Benchmark: evaluation throughput (issue 21): the loop around the model, three ways, side by side in one run.

* `serial_b1` (like the reference's evaluation): one image at a time, all its expressions in one teacher-forced
  forward (`evaluate_with_segment(batch_size=1)`); everything in the main process: reading the sample (polygon
  rasterising), decoding the JPEG, tiling, the forward, then logits to the CPU, sigmoid, resize, boxes and NumPy
  metrics.
* `segment_b8` (today's loop before issue 21): the same through `model.segment` 8 images per forward
  (`evaluate_with_segment(batch_size=8)`).
* `loader_b8` (`evaluate_dataset`): `DataLoader` workers read, rasterise, decode and tile the next batches while the
  model runs; the masks are scored where the logits are (sigmoid, resize, threshold, I / U / box as tensors) and
  only the counts come back. `loader_b8_grouped` adds batching by tile count and prompt length.

Workload, RefCOCO-like: a `refer`-layout dataset written to a temporary folder (`instances.json` with polygon
annotations, `refs(unc).p`, JPEG images of 640x480, 640x427, 480x640 and 612x612 pixels), 7 expressions per image
(3 objects with 3 + 2 + 2 sentences), read through `ReferDataset` as `mllmseg evaluate` reads RefCOCO. Model: the
random tiny model (`mllmseg.tiny`, 112 px tiles), whose forward (~10 ms per image on one core) is in the range of
the estimated GPU time of the real models (9-18 ms per image at 8B, 2-4 ms at 1B), so the share of the work around
the model is like a GPU's; its tiles are smaller than the real 448 px ones, so tiling here is cheaper than real.

Reported per side: images/s (wall time), the fraction of the wall time the model is busy (time inside the model's
`forward`, through forward hooks; synchronised on CUDA), the main process's CPU time per image, and the ratios;
the sides run interleaved (A, B, C, A, B, C, ...) and medians are reported. Before timing, the metric states are
checked: `loader_b8` must equal `segment_b8` bit for bit (same batches), the others the same counts up to float
rounding of other batch shapes. The model runs single-threaded (as the other CPU benchmarks); on a CPU the workers
compete with the model for the cores, and on this shared 2-core machine with other jobs too: the figures are
under contention.

    .venv/bin/python benchmarks/bench_evaluation.py [--quick] [--images 48] [--repeats 3] [--workers N] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine, median, random_image, single_thread

from mllmseg.data.refer import ReferDataset
from mllmseg.evaluation.batches import default_num_workers
from mllmseg.evaluation.evaluate import evaluate_dataset, evaluate_with_segment
from mllmseg.tiny import build_processor, build_tiny_model

COCO_NAME = "images/mscoco/images/train2014/COCO_train2014_{:012d}.jpg"
SIZES = [(480, 640), (427, 640), (640, 480), (612, 612)]  # (height, width), common COCO shapes
SENTENCES_PER_OBJECT = (3, 2, 2)  # 7 expressions per image, as RefCOCO val (~7.2 per image)
WORDS = ("man woman left right middle red blue white shirt chair table dog cat car front back small big person "
         "holding standing sitting near far top bottom second first green black the with on in").split()


def polygon(rng, height: int, width: int) -> list[float]:
    """A star-shaped polygon of 16-40 vertices somewhere in the image, COCO `[x0, y0, x1, y1, ...]`."""
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    n = int(rng.integers(16, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.05, 0.3) * min(height, width) * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + radius * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radius * np.sin(angles), 0, height - 1)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def write_refcoco_like(root: Path, num_images: int, seed: int = 0) -> None:
    """A `refer`-layout `refcoco` folder under `root` with `num_images` val images."""
    rng = np.random.default_rng(seed)
    images, annotations, refs = [], [], []
    for i in range(num_images):
        image_id = 100000 + i
        height, width = SIZES[i % len(SIZES)]
        path = root / COCO_NAME.format(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(width, height, seed=i).save(path, quality=90)
        images.append({"id": image_id, "height": height, "width": width, "file_name": path.name})
        for k, count in enumerate(SENTENCES_PER_OBJECT):
            ann_id = image_id * 10 + k
            poly = polygon(rng, height, width)
            xs, ys = poly[0::2], poly[1::2]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "segmentation": [poly], "area": 0.0,
                                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
            sentences = []
            for s in range(count):
                words = [str(w) for w in rng.choice(WORDS, int(rng.integers(2, 9)))]
                sentences.append({"sent": " ".join(words), "raw": " ".join(words), "tokens": words,
                                  "sent_id": ann_id * 10 + s})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": "val",
                         "category_id": 1, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                         "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]})
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)


class ModelClock:
    """Time spent inside `model.forward` (forward hooks, outermost call only), synchronised on CUDA."""

    def __init__(self, model):
        self.busy, self._start, self._depth = 0.0, 0.0, 0
        self.sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave)

    def _enter(self, module, args):
        if self._depth == 0:
            self.sync()
            self._start = time.perf_counter()
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.sync()
            self.busy += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 images, 2 repeats (unless given)")
    parser.add_argument("--images", type=int, help="images in the dataset (default 48)")
    parser.add_argument("--repeats", type=int, help="timed runs per side (interleaved), medians kept (default 3)")
    parser.add_argument("--workers", type=int, help="loader workers (default: evaluate_dataset's default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--tiling", choices=("single", "dynamic"), default="single",
                        help="single (default, as the released checkpoints) or dynamic (13 tiles of 112 px for 640x480)")
    args = parser.parse_args()
    args.images = args.images or (24 if args.quick else 48)
    args.repeats = args.repeats or (2 if args.quick else 3)
    single_thread()
    workers = default_num_workers() if args.workers is None else args.workers
    model, tokenizer = build_tiny_model(seed=0)
    model = model.eval().to(args.device)
    processor = build_processor(tokenizer, model.config)
    clock = ModelClock(model)

    with tempfile.TemporaryDirectory() as tmp:
        write_refcoco_like(Path(tmp), args.images)
        dataset = ReferDataset(tmp, "refcoco", split="val")
        common = dict(tiling=args.tiling, progress=False)
        sides = {
            "serial_b1": lambda: evaluate_with_segment(model, processor, dataset, batch_size=1, **common),
            "segment_b8": lambda: evaluate_with_segment(model, processor, dataset, batch_size=8, **common),
            "loader_b8": lambda: evaluate_dataset(model, processor, dataset, batch_size=8, num_workers=workers,
                                                  **common),
            "loader_b8_grouped": lambda: evaluate_dataset(model, processor, dataset, batch_size=8,
                                                          num_workers=workers, group_by_length=True, **common),
        }
        with torch.inference_mode():
            metrics = {name: fn()["metrics"] for name, fn in sides.items()}  # also the warm-up round
        check_metrics(metrics)
        wall = {name: [] for name in sides}
        busy = {name: [] for name in sides}
        cpu = {name: [] for name in sides}
        worker_cpu = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                clock.busy = 0.0
                start, start_cpu, start_children = time.perf_counter(), time.process_time(), children_cpu()
                with torch.inference_mode():
                    fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                worker_cpu[name].append(children_cpu() - start_children)  # the workers end with the loop
                busy[name].append(clock.busy)

    n = args.images
    print(f"machine: {machine()}; device {args.device}; loader workers {workers}")
    print(f"workload: {n} RefCOCO-like images ({', '.join(f'{w}x{h}' for h, w in SIZES)}), "
          f"{metrics['serial_b1']['n_expressions']} expressions, polygon ground truth, JPEG files; tiny model, "
          f"{args.tiling} tiling; {args.repeats} interleaved repeats, medians")
    print("\n| loop | images/s | model busy | CPU ms / image: main process | workers | wall s | vs serial_b1 | "
          "vs segment_b8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rate = {name: n / median(wall[name]) for name in sides}
    for name in sides:
        frac = median([b / w for b, w in zip(busy[name], wall[name])])
        print(f"| {name} | {rate[name]:.1f} | {frac:.0%} | {median(cpu[name]) / n * 1e3:.1f} | "
              f"{median(worker_cpu[name]) / n * 1e3:.1f} | {median(wall[name]):.2f} | {rate[name] / rate['serial_b1']:.2f}x | "
              f"{rate[name] / rate['segment_b8']:.2f}x |")
    per = [s / f for s, f in zip(wall["segment_b8"], wall["loader_b8"])]
    print(f"\nloader_b8 vs segment_b8 per-repeat wall ratios {min(per):.2f}-{max(per):.2f}x. Metric states: loader_b8 "
          "== segment_b8 exactly; serial_b1 and the grouped loop equal in counts up to float rounding (checked).")
    busy_line = " ".join(f"busy_{k}={median([b / w for b, w in zip(busy[k], wall[k])]):.2f}" for k in sides)
    print(f"RESULT evaluation images_per_s serial_b1={rate['serial_b1']:.1f} segment_b8={rate['segment_b8']:.1f} "
          f"loader_b8={rate['loader_b8']:.1f} grouped={rate['loader_b8_grouped']:.1f} "
          f"ratio_vs_serial={rate['loader_b8'] / rate['serial_b1']:.2f} "
          f"ratio_vs_segment_b8={rate['loader_b8'] / rate['segment_b8']:.2f} {busy_line} "
          f"main_cpu_ms_segment_b8={median(cpu['segment_b8']) / n * 1e3:.1f} "
          f"main_cpu_ms_loader_b8={median(cpu['loader_b8']) / n * 1e3:.1f} workers={workers} tiling={args.tiling}")


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the loader workers, once a loop is done)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_metrics(metrics: dict) -> None:
    """The loops agree: bit for bit where the batches are the same, the counts within float rounding elsewhere."""
    reference = metrics["segment_b8"]
    if metrics["loader_b8"] != reference:
        raise SystemExit(f"MISMATCH: loader_b8 {metrics['loader_b8']} != segment_b8 {reference}")
    for name in ("serial_b1", "loader_b8_grouped"):
        got = metrics[name]
        for key in ("n_expressions", "n_images", "n_rec"):
            if got[key] != reference[key]:
                raise SystemExit(f"MISMATCH: {name} {key} {got[key]} != {reference[key]}")
        for key in ("I_sum", "U_sum"):
            if abs(got[key] - reference[key]) > 1e-4 * max(1, reference[key]):
                raise SystemExit(f"MISMATCH: {name} {key} {got[key]} vs {reference[key]}")


if __name__ == "__main__":
    main()
