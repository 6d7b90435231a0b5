"""Benchmark 5: DSFF mask decoder cost at 8B dimensions, and how `segment` time grows with the number of tiles.

Part A, the decoder alone at InternVL2.5-8B sizes: ViT width D = 1024 (InternViT-300M), LLM width T = 4096, 448 px
tile, patch 14 -> 32x32 ViT grid (`T_img^1` `[1024, 1024]`), 16x16 LLM grid (`T_img^2` `[256, 4096]`), 34.39M
parameters, random weights, eval mode, `torch.inference_mode`, CPU, float32 and bfloat16. Time: image fusion of one
tile (`fuse_image`, shared by every mask of that tile) and the per-mask head (`decode`), CPU time, medians, the two
dtypes interleaved. Peak memory: measured in a fresh subprocess per (dtype, masks) as the rise of the process's peak
RSS over its resident size just before the first forward (weights and inputs already
allocated), so it counts every byte the forward touches (activations, oneDNN scratch, allocator slack); per-mask
memory is the slope between 1 and 8 masks. (tracemalloc does not see torch's allocations; the peak is Linux's
`VmHWM` after resetting it through `/proc/self/clear_refs`, so that building the weights does not mask the forward.)

Part B, `segment` time vs tiles on a small random config (224 px tiles): images of aspect ratio n:1 give an InternVL
grid of 1 x n tiles plus the thumbnail (dynamic tiling, max 12 tiles); least-squares line of time against the number
of tiles the model sees, with R^2.

    .venv/bin/python benchmarks/bench_decoder.py [--quick] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import QUICK_CONFIG, child_json, machine, median, peak_rss_rise_mib, single_thread

from mllmseg.remote_code.mask_decoder_mllmseg import DSFFMaskDecoder

D, T, GRID, PATCH = 1024, 4096, 32, 14


def decoder_and_inputs(dtype, masks: int, seed: int = 0):
    torch.manual_seed(seed)
    decoder = DSFFMaskDecoder(D, T, GRID, PATCH).eval().to(dtype)
    vit = torch.randn(1, GRID * GRID, D, dtype=dtype)
    llm = torch.randn(1, (GRID // 2) ** 2, T, dtype=dtype)
    seg = torch.randn(masks, T, dtype=dtype)
    return decoder, vit, llm, seg


class PerMaskSelfAttention(torch.nn.Module):
    """`ca_layer_vl` in the reference's order: nothing in `fuse_image`, the whole block (self-attention included)
    once per mask. Same weights, same outputs; only where the self-attention runs differs."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def self_attend(self, query):
        return query

    def attend_memory(self, query, memory):
        return self.block(query, memory)


def reference_order(decoder):
    reference = copy.deepcopy(decoder)
    reference.ca_layer_vl = PerMaskSelfAttention(reference.ca_layer_vl)
    return reference


@torch.inference_mode()
def run_decoder(decoder, vit, llm, seg):
    fused = decoder.fuse_image(vit, llm)
    return decoder.decode(fused.expand(seg.shape[0], -1, -1), seg)


def memory_child(dtype_name: str, masks: int) -> dict:
    """In a fresh process: peak-RSS rise of the first forward."""
    single_thread()
    dtype = getattr(torch, dtype_name)
    decoder, vit, llm, seg = decoder_and_inputs(dtype, masks)
    rise, out = peak_rss_rise_mib(lambda: run_decoder(decoder, vit, llm, seg))
    return {"peak_rise_mib": rise, "out": list(out.shape)}


def measure_memory(dtype_name: str, masks: int) -> float:
    return child_json("bench_decoder", "memory_child", dtype_name, masks)["peak_rise_mib"]


def part_a(repeats: int):
    single_thread()
    params = None
    setups = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder, vit, llm, seg = decoder_and_inputs(dtype, 1)
        params = sum(p.numel() for p in decoder.parameters())
        with torch.inference_mode():
            fused = decoder.fuse_image(vit, llm)
        setups[dtype] = (decoder, vit, llm, seg, fused)
    times = {(dtype, part): [] for dtype in setups for part in ("fuse", "decode")}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for dtype, (decoder, vit, llm, seg, fused) in setups.items():
                start = time.process_time()
                decoder.fuse_image(vit, llm)
                mid = time.process_time()
                decoder.decode(fused, seg)
                end = time.process_time()
                if rep:  # the first round warms up
                    times[(dtype, "fuse")].append(mid - start)
                    times[(dtype, "decode")].append(end - mid)
    fp32_out = run_decoder(*setups[torch.float32][:4]).float()
    bf16_out = run_decoder(*setups[torch.bfloat16][:4]).float()
    print(f"decoder parameters {params:,}; bf16 vs fp32 outputs (same weights rounded): max |diff| "
          f"{float((fp32_out - bf16_out).abs().max()):.3f} on logits up to {float(fp32_out.abs().max()):.1f}")
    rows = {}
    for dtype in setups:
        name = str(dtype).replace("torch.", "")
        fuse, dec = median(times[(dtype, "fuse")]), median(times[(dtype, "decode")])
        one, eight = measure_memory(name, 1), measure_memory(name, 8)
        rows[name] = dict(fuse_ms=fuse * 1e3, decode_ms=dec * 1e3, one_mask_ms=(fuse + dec) * 1e3,
                          mem_1_mib=one, mem_8_mib=eight, mem_per_mask_mib=(eight - one) / 7)
        print(f"{name:9s} fuse (per tile) {fuse * 1e3:7.1f} ms, decode (per mask) {dec * 1e3:7.1f} ms, one mask "
              f"{(fuse + dec) * 1e3:7.1f} ms, 5 masks of one tile {(fuse + 5 * dec) * 1e3:7.1f} ms; peak RSS rise "
              f"1 mask {one:6.1f} MiB, 8 masks {eight:6.1f} MiB -> {(eight - one) / 7:5.1f} MiB per extra mask")
    ratio = rows["bfloat16"]["one_mask_ms"] / rows["float32"]["one_mask_ms"]
    print(f"bf16 / fp32 time for one mask: {ratio:.2f}x (medians of {repeats}, interleaved)")

    # ca_layer_vl's self-attention once per tile (ours) vs once per mask (the reference), 5 masks of one tile.
    decoder, vit, llm, _ = setups[torch.float32][:4]
    seg5 = torch.randn(5, T)
    reference = reference_order(decoder)
    assert torch.allclose(run_decoder(decoder, vit, llm, seg5), run_decoder(reference, vit, llm, seg5), atol=1e-3)
    order_times = {"ours": [], "reference": []}
    for rep in range(repeats + 1):
        for name, model in (("ours", decoder), ("reference", reference)):
            start = time.process_time()
            run_decoder(model, vit, llm, seg5)
            if rep:
                order_times[name].append(time.process_time() - start)
    ours, ref = median(order_times["ours"]) * 1e3, median(order_times["reference"]) * 1e3
    print(f"float32, 5 masks of one tile: self-attention per tile {ours:7.1f} ms, per mask (reference order) "
          f"{ref:7.1f} ms -> {ref / ours:.2f}x faster")
    rows["five_masks_ms"] = dict(ours=ours, reference_order=ref)
    return rows


def part_b(repeats: int, max_tiles: int):
    from _common import random_image
    from mllmseg.tiny import build_processor, build_tiny_model

    single_thread()
    model, tokenizer = build_tiny_model(seed=0, **QUICK_CONFIG)
    processor = build_processor(tokenizer, model.config)  # InternVL2.5 system message
    size = model.config.image_size
    cases = []
    for n in range(1, max_tiles + 1):
        image = random_image(size * n, size, seed=n)
        feats = processor.image_processor(image, tiling="dynamic", max_tiles=max_tiles)
        cases.append((image, int(feats["num_tiles"][0]), tuple(int(v) for v in feats["tile_grids"][0])))
    times = {i: [] for i in range(len(cases))}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for i, (image, _, _) in enumerate(cases):
                start = time.process_time()
                model.segment(processor, image, ["the red circle"], tiling="dynamic")
                if rep:
                    times[i].append(time.process_time() - start)
    xs = torch.tensor([float(c[1]) for c in cases], dtype=torch.float64)
    ys = torch.tensor([median(times[i]) * 1e3 for i in range(len(cases))], dtype=torch.float64)
    a = torch.stack([xs, torch.ones_like(xs)], 1)
    slope, intercept = torch.linalg.lstsq(a, ys[:, None]).solution.flatten().tolist()
    pred = slope * xs + intercept
    r2 = 1 - float(((ys - pred) ** 2).sum() / ((ys - ys.mean()) ** 2).sum())
    print(f"segment vs tiles ({model.config.image_size} px tiles, ViT {model.config.vision_config.num_hidden_layers}x"
          f"{model.config.vision_config.hidden_size}, LLM {model.config.text_config.num_hidden_layers}x"
          f"{model.config.text_config.hidden_size}, one expression, dynamic tiling, medians of {repeats}):")
    print("  " + ", ".join(f"{c[2][0]}x{c[2][1]}{'+thumb' if c[1] > c[2][0] * c[2][1] else ''}={c[1]}: {y:.0f} ms"
                           for c, y in zip(cases, ys.tolist())))
    print(f"  least squares: time = {slope:.1f} ms/tile x tiles + {intercept:.1f} ms, R^2 = {r2:.4f}")
    return slope, intercept, r2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, tiles up to 6")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    single_thread()
    print(f"# 5. Decoder cost at 8B dimensions, and segment time vs tiles\n{machine()}")
    rows = part_a(repeats)
    slope, intercept, r2 = part_b(repeats, 6 if args.quick else 12)
    print(f"RESULT decoder fp32 one_mask_ms={rows['float32']['one_mask_ms']:.1f} "
          f"decode_per_mask_ms={rows['float32']['decode_ms']:.1f} mem_per_mask_mib={rows['float32']['mem_per_mask_mib']:.1f} "
          f"| bf16 one_mask_ms={rows['bfloat16']['one_mask_ms']:.1f} | tiles slope={slope:.1f}ms intercept={intercept:.1f}ms "
          f"R2={r2:.4f}")


if __name__ == "__main__":
    main()
