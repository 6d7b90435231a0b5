"""The GPU benchmark driver (run through `benchmarks/gpu.sh`): real shapes, random bf16 weights, one JSON file.

Sections (each a key of the results file; a section that cannot run says why under `"skipped"`):

* `environment`: versions, device, attention implementations available.
* `matmul`: the measured bf16 matmul rate ([8192 x 8192] on CUDA, [2048 x 2048] on CPU) and the nominal floor rate
  (790 TFLOP/s on an H200, dense bf16, the figure of issue 21; on CPU the measured rate).
* `segment`: `model.segment` latency per image at 1B and 8B, k = 1 / 7 expressions x 1 / 7 tiles (`tiling="single"`
  on a 640 x 480 image; `"dynamic"` on a 3:2 image: 2 x 3 tiles + thumbnail), per attention implementation (sdpa,
  and flash-attention 2 where `flash_attn` imports), with its matrix FLOPs (`_real.py`), the floor at the nominal
  and at the measured rate, and the peak memory of the call.
* `evaluation`: images/s of `segment` over 8 images x 7 expressions per call (`batch_size=8`), 1 tile each.
* `chat`: time to first token (a 1-token `chat`) and decoding tokens/s (`min_new_tokens = max_new_tokens`).
* `training`: one LoRA step (`res_8b.yaml`'s `lora:` recipe, AdamW on the trainable set, batch of 4 one-tile
  samples with 3 masks each) at 8B with gradient checkpointing off and on: step time, peak memory.
* `deepspeed`: one ZeRO-2 step through `mllmseg/recipes/zero2.json` (its "auto" values filled as the HF Trainer
  would: bf16 on, batch 4, clipping 1.0), single process, when `deepspeed` imports.

Timing: CUDA is synchronised around each call; medians of `--repeats` after a warm-up. Peak memory:
`torch.cuda.max_memory_allocated` (reset before each call) on CUDA; on CPU the rise of the process's peak RSS
(`VmHWM`), which also counts allocator slack. `--tiny --device cpu` runs every section with tiny shapes (the test
`tests/test_bench_gpu_script.py` does); `--budget-s` stops starting new sections once that many seconds have passed.

    python benchmarks/bench_gpu.py [--tiny] [--device cuda] [--out gpu_results.json] [--budget-s 420]
    python benchmarks/bench_gpu.py --check-requirements   # prints the unmet requirements, one per line
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# What the benchmark imports (setup.py's runtime ranges, the ones this script needs); gpu.sh installs what is unmet
# from carried wheels. torch is checked, never installed from here unless its wheel is carried too.
REQUIREMENTS = ["torch>=2.4", "transformers>=5.18,<6", "peft>=0.21", "accelerate>=1.10", "tokenizers>=0.23.1",
                "safetensors>=0.8", "huggingface-hub>=1.31", "pillow>=10", "numpy>=2", "pyyaml>=6", "packaging"]
H200_BF16_FLOPS = 790e12
EXPRESSIONS = ["the red circle", "the big blue square", "the small green triangle on the left", "all shapes",
               "the yellow star", "the thing in the middle", "the two cars"]


def unmet_requirements() -> list[str]:
    """The requirement strings of REQUIREMENTS that the installed distributions do not satisfy."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    unmet = []
    for spec in REQUIREMENTS:
        req = Requirement(spec)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            unmet.append(spec)
            continue
        if req.specifier and not req.specifier.contains(installed.split("+")[0], prereleases=True):
            unmet.append(spec)
    return unmet


# -- measuring ---------------------------------------------------------------------------------------------------
class Meter:
    """Latency (medians, device synchronised) and peak memory of calls on one device."""

    def __init__(self, device: str, repeats: int):
        import torch

        self.torch, self.device, self.repeats = torch, device, repeats
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def seconds(self, fn, repeats: int | None = None) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats or self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak_mib(self, fn) -> float:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats()
            fn()
            self.sync()
            return self.torch.cuda.max_memory_allocated() / 2**20
        from _common import peak_rss_rise_mib

        return peak_rss_rise_mib(fn)[0]

    @property
    def memory_method(self) -> str:
        return ("torch.cuda.max_memory_allocated (reset before the call)" if self.cuda
                else "peak RSS rise (VmHWM - VmRSS before, reset via /proc/self/clear_refs)")


def images(tiny: bool):
    from _common import random_image

    size = 112 if tiny else 448
    return {1: ("single", random_image(640, 480)), 7: ("dynamic", random_image(3 * size, 2 * size))}


# -- sections ----------------------------------------------------------------------------------------------------
def environment(args) -> dict:
    import importlib.util

    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
           "device": args.device, "cuda_available": torch.cuda.is_available(), "tiny": args.tiny,
           "cpu_threads": torch.get_num_threads(),
           "attention": attention_implementations(args.device)}
    if args.device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name(0)
        out["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    for name in ("flash_attn", "deepspeed", "peft"):
        out[f"{name}_importable"] = importlib.util.find_spec(name) is not None
    return out


def attention_implementations(device: str) -> list[str]:
    import importlib.util

    impls = ["sdpa"]
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    return impls


def matmul(args, meter) -> dict:
    import torch

    from _real import matmul_rate

    n = 256 if args.tiny else (8192 if meter.cuda else 2048)
    rate = matmul_rate(torch.bfloat16, args.device, n=n, seconds=0.3 if args.tiny else 2.0)
    nominal = H200_BF16_FLOPS if meter.cuda else rate
    return {"n": n, "measured_flops": rate, "nominal_flops": nominal,
            "nominal_source": "H200 dense bf16, issue 21" if meter.cuda else "measured (CPU)"}


def sizes(args) -> list[str]:
    return ["tiny"] if args.tiny else ["1b", "8b"]


def segment(args, meter, model, processor, size, rates) -> list[dict]:
    from _real import stage_flops, workload_from_batch

    rows = []
    for impl in attention_implementations(args.device):
        try:
            model.set_attn_implementation(impl)
        except Exception as error:  # noqa: BLE001 - recorded, the other implementations still run
            rows.append({"size": size, "attention": impl, "error": f"{type(error).__name__}: {error}"})
            continue
        for tiles, (tiling, image) in images(args.tiny).items():
            for k in (1, 7):
                exprs = EXPRESSIONS[:k]
                question, answer = processor.segmentation_prompt(exprs)
                batch = processor(images=[image], text=[question], answers=[answer], tiling=tiling)
                flops = sum(stage_flops(model.config, workload_from_batch(model.config, batch)).values())
                run = lambda: model.segment(processor, image, exprs, tiling=tiling)  # noqa: E731
                latency = meter.seconds(run)
                rows.append({"size": size, "attention": impl, "tiles": int(batch["pixel_values"].shape[0]), "k": k,
                             "tokens": int(batch["input_ids"].shape[1]), "latency_ms": latency * 1e3,
                             "gflop": flops / 1e9, "floor_ms": flops / rates["nominal_flops"] * 1e3,
                             "ratio_to_floor": latency / (flops / rates["nominal_flops"]),
                             "floor_measured_rate_ms": flops / rates["measured_flops"] * 1e3,
                             "peak_memory_mib": meter.peak_mib(run)})
    model.set_attn_implementation("sdpa")
    return rows


def evaluation(args, meter, model, processor, size) -> dict:
    batch = 8
    image = images(args.tiny)[1][1]
    imgs, exprs = [image] * batch, [EXPRESSIONS] * batch
    seconds = meter.seconds(lambda: model.segment(processor, imgs, exprs, tiling="single", batch_size=batch),
                            repeats=max(1, meter.repeats // 2))
    return {"size": size, "images_per_call": batch, "expressions_per_image": len(EXPRESSIONS),
            "images_per_s": batch / seconds, "seconds_per_call": seconds}


def chat(args, meter, model, processor, size) -> dict:
    import torch

    pixel_values = processor.image_processor(images(args.tiny)[1][1], tiling="single")["pixel_values"]
    pixel_values = pixel_values.to(model.device, model.dtype)
    new = 8 if args.tiny else 128
    question = "Describe the image in detail."

    def generate(tokens):
        return model.chat(processor, pixel_values, question,
                          dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False))

    with torch.inference_mode():
        first = meter.seconds(lambda: generate(1))
        full = meter.seconds(lambda: generate(new), repeats=max(1, meter.repeats // 2))
    return {"size": size, "time_to_first_token_ms": first * 1e3, "new_tokens": new,
            "decode_tokens_per_s": (new - 1) / max(full - first, 1e-9), "total_s": full}


def training_batch(processor, tiny: bool, device, samples: int = 4):
    import torch

    from _common import random_image

    size = 112 if tiny else 448
    exprs = EXPRESSIONS[:3]
    question, answer = processor.segmentation_prompt(exprs)
    enc = processor(images=[random_image(640, 480, seed=i) for i in range(samples)], text=[question] * samples,
                    answers=[answer] * samples, tiling="single")
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(len(exprs), size, size, generator=generator) > 0.5 for _ in range(samples)]
    batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "labels", "tile_grids")}
    batch["pixel_values"] = enc["pixel_values"]
    batch["masks"] = [m.to(device) for m in masks]
    return batch


def lora_model(model):
    from mllmseg.training.lora import LoraRecipe, apply_lora, trainable_parameter_counts
    from mllmseg.training.recipes import load_recipe

    model = apply_lora(model, LoraRecipe(**dict(load_recipe("res_8b")["lora"])))
    return model, trainable_parameter_counts(model)


def train_step_fn(model, batch, optimizer):
    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def training(args, meter, model, processor, size) -> tuple[dict, object]:
    """(results, the LoRA-wrapped model, reused by the DeepSpeed step)."""
    import torch

    model, counts = lora_model(model)
    model.train()
    batch = training_batch(processor, args.tiny, args.device)
    batch["pixel_values"] = batch["pixel_values"].to(args.device, model.dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    rows = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        step = train_step_fn(model, batch, optimizer)
        seconds = meter.seconds(step, repeats=max(1, meter.repeats // 2))
        rows.append({"size": size, "gradient_checkpointing": checkpointing, "step_s": seconds,
                     "peak_memory_mib": meter.peak_mib(step), "batch": len(batch["masks"]),
                     "loss_finite": bool(torch.isfinite(torch.tensor(step())))})
    model.gradient_checkpointing_disable()
    optimizer.state.clear()
    return {"trainable_parameters": sum(p.numel() for p in trainable), "trainable_by_part": counts,
            "steps": rows}, model


def resolved_zero_config(batch_size: int, path: Path = ROOT / "mllmseg" / "recipes" / "zero2.json") -> dict:
    """The project's ZeRO-2 config with its "auto" values filled as the HF Trainer fills them for one process:
    bf16 on, fp16 off, no accumulation, gradient clipping 1.0, batch sizes = `batch_size`."""
    config = json.loads(path.read_text())
    fills = {("bf16", "enabled"): True, ("fp16", "enabled"): False, ("gradient_accumulation_steps",): 1,
             ("gradient_clipping",): 1.0, ("train_batch_size",): batch_size,
             ("train_micro_batch_size_per_gpu",): batch_size}
    for keys, value in fills.items():
        node = config
        for key in keys[:-1]:
            node = node[key]
        if node.get(keys[-1]) == "auto":
            node[keys[-1]] = value
    left = [k for k, v in config.items() if v == "auto"]
    if left:
        raise ValueError(f"{path}: 'auto' values this script does not know how to fill: {left}")
    return config


def deepspeed_step(args, meter, model, processor, size) -> dict:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not importable"}
    if not meter.cuda:
        return {"skipped": "ZeRO-2 needs a CUDA device here"}
    import deepspeed
    import torch

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl")
    batch = training_batch(processor, args.tiny, args.device)
    batch["pixel_values"] = batch["pixel_values"].to(args.device, model.dtype)
    config = resolved_zero_config(len(batch["masks"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                           optimizer=torch.optim.AdamW(trainable, lr=1e-5))

    def step():
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return float(loss)

    seconds = meter.seconds(step, repeats=max(1, meter.repeats // 2))
    return {"size": size, "zero_stage": config["zero_optimization"]["stage"], "step_s": seconds,
            "peak_memory_mib": meter.peak_mib(step), "config": config}


# -- driver ------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU test mode)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(HERE / "gpu_results.json"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new section after this many seconds (gpu.sh gives the whole run 480 s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own; 1 in --tiny mode, where thread hand-offs on a "
                             "shared machine cost more than the tiny kernels)")
    parser.add_argument("--check-requirements", action="store_true")
    args = parser.parse_args(argv)
    if args.check_requirements:
        print("\n".join(unmet_requirements()))
        return {}
    sys.path[:0] = [str(HERE), str(ROOT)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from _real import real_model

    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    meter = Meter(args.device, args.repeats or (1 if args.tiny else 5))
    results = {"environment": environment(args), "memory_method": meter.memory_method}
    results["matmul"] = matmul(args, meter)
    results.update(segment=[], evaluation=[], chat=[], training={}, deepspeed={})

    def over_budget(section: str) -> bool:
        took = time.perf_counter() - start
        if took > args.budget_s:
            results.setdefault("skipped_for_time", []).append(f"{section} (at {took:.0f} s)")
            return True
        return False

    for size in sizes(args):
        if over_budget(f"segment {size}"):
            continue
        model, processor, _ = real_model(size, dtype=torch.bfloat16, device=args.device)
        results["segment"] += segment(args, meter, model, processor, size, results["matmul"])
        if not over_budget(f"evaluation {size}"):
            results["evaluation"].append(evaluation(args, meter, model, processor, size))
        if not over_budget(f"chat {size}"):
            results["chat"].append(chat(args, meter, model, processor, size))
        if size == sizes(args)[-1] and not over_budget("training"):  # 8B (or tiny): training, then DeepSpeed
            results["training"], model = training(args, meter, model, processor, size)
            if not over_budget("deepspeed"):
                results["deepspeed"] = deepspeed_step(args, meter, model, processor, size)
        del model
        if meter.cuda:
            torch.cuda.empty_cache()
        write(results, args.out)  # after each size, so a timeout still leaves the figures so far
    results["total_s"] = time.perf_counter() - start
    write(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "deepspeed"}, indent=1, default=str)[:4000])
    return results


def write(results: dict, path: str):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
