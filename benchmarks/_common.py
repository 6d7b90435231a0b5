"""Shared helpers of the benchmarks: side-by-side timing, the mid-sized random model, machine description.

Timing rule (the machine is shared and noisy): the two sides run interleaved (A, B, A, B, ...) in one process, and
medians and the ratio of medians are reported, with the per-repeat ratio range so the noise is visible. torch runs
single-threaded (`torch.set_num_threads(1)`, as the preprocessing benchmark) and each repeat is timed in CPU time of
this process (`time.process_time`), which other jobs on the machine do not inflate; wall time is printed alongside.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The mid-sized random config of benchmarks 2 and 3: 448 px tiles (1024 ViT tokens, 256 image tokens in the LLM) so
# that image work dominates, as it does at 8B.
MID_CONFIG = dict(image_size=448, vision_width=256, text_width=384, vision_layers=6, text_layers=4)
QUICK_CONFIG = dict(image_size=224, vision_width=128, text_width=192, vision_layers=2, text_layers=2)


def proc_status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`): this process's resident / peak resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_rise_mib(fn) -> tuple[float, object]:
    """(MiB, result): the rise of this process's peak resident memory while `fn()` runs, i.e. `VmHWM` after it minus
    `VmRSS` before it, the peak being reset first through `/proc/self/clear_refs`. Counts every byte the call
    touches (activations, oneDNN scratch, allocator slack), which tracemalloc cannot see for torch tensors. Run it
    in a fresh process per measurement ([`child_json`]) so that earlier calls' freed memory does not hide the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = proc_status_kib("VmRSS")
    result = fn()
    return (proc_status_kib("VmHWM") - before) / 1024, result


def child_json(script: str, function: str, *args) -> dict:
    """`function(*args)` of benchmarks/`script` run in a fresh Python process; its JSON-able return value."""
    import json
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json; sys.path.insert(0, {here!r}); from {script} import {function}; "
            f"print(json.dumps({function}(*{list(args)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{script}.{function}{tuple(args)} failed in its subprocess:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpus = os.cpu_count()
    try:
        load = "load average %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {load}")


def single_thread():
    import torch

    torch.set_num_threads(1)


WALL: dict[str, list[float]] = {}


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """CPU time of each function (this process), the functions alternating; `warmup` untimed rounds first.
    Wall times go to `WALL` under the same names."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for name in fns:
        WALL[name] = []
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.process_time() - cpu)
            WALL[name].append(time.perf_counter() - wall)
    return times


def median(values) -> float:
    return statistics.median(values)


def ratio_line(times: dict[str, list[float]], slow: str, fast: str) -> str:
    """`slow / fast` as the ratio of medians, with the range of per-repeat ratios."""
    per = [s / f for s, f in zip(times[slow], times[fast])]
    line = (f"CPU time: {slow} {median(times[slow]) * 1e3:.1f} ms, {fast} {median(times[fast]) * 1e3:.1f} ms (medians of "
            f"{len(per)}) -> {median(times[slow]) / median(times[fast]):.2f}x (per-repeat {min(per):.2f}-{max(per):.2f}x)")
    if WALL.get(slow) and WALL.get(fast):
        line += f"; wall-time ratio {median(WALL[slow]) / median(WALL[fast]):.2f}x"
    return line


def random_image(width: int = 640, height: int = 480, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def mid_model(quick: bool = False, seed: int = 0):
    """A random MLLMSeg model of the mid-sized config (or the quick one) and its processor, with the InternVL2.5
    system message real checkpoints use (the processor's default)."""
    from mllmseg.tiny import build_processor, build_tiny_model

    model, tokenizer = build_tiny_model(seed=seed, **(QUICK_CONFIG if quick else MID_CONFIG))
    processor = build_processor(tokenizer, model.config)
    return model.eval(), processor


def describe(model) -> str:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    return (f"random model: ViT {c.vision_config.num_hidden_layers} layers x {c.vision_config.hidden_size}, LLM "
            f"{c.text_config.num_hidden_layers} layers x {c.text_config.hidden_size}, {c.image_size} px tiles "
            f"({c.vision_grid}x{c.vision_grid} ViT grid, {c.tokens_per_tile} image tokens), {params / 1e6:.1f}M params")


def predict_masks(model, ids, hidden, image_outputs, seg_emb, seg_sample, tiles, tile_grids):
    """Mask logits from final states, as the model's forward computes them."""
    return model.predict_masks(model.mask_head_inputs(ids, hidden, image_outputs), seg_emb, seg_sample, tiles, tile_grids)