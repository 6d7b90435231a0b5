"""Real-size random models and their FLOP counts, shared by `bench_real_size.py` (CPU) and `bench_gpu.py` (GPU).

Nothing is downloaded: the models are built on the meta device with the InternVL2.5 shapes, materialised with
`to_empty` and filled by a cheap random init (normal 0.02 for matrices, ones / zeros for norms and biases; the
computed buffers - rotary frequencies, DySample positions, BatchNorm statistics - recomputed). The tokenizer is the
tiny locally trained one (`mllmseg.tiny`), with the vocabulary *size* set to the real one: every id it emits is a
valid row, the LM head and embeddings have the real shapes. Its byte-level BPE was trained on a few English lines,
so it splits the Chinese InternVL system message into more tokens than Qwen2.5's tokenizer would: the token counts
the benchmarks print are those of their own prompts, and every FLOP floor uses them.

FLOPs: one multiply-add = 2 FLOPs; only matrix products (linear layers, attention products, convolutions) count.
Causal LLM attention counts the lower triangle (L * (L + 1) / 2 score entries): the least a kernel must do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import InternVLVisionConfig

from mllmseg.remote_code.configuration_mllmseg import MLLMSegConfig, token_id_fields
from mllmseg.remote_code.mask_decoder_mllmseg import DySampleUpsampler
from mllmseg.remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
from mllmseg.tiny import build_processor, build_tiny_tokenizer

# InternViT-300M (both sizes), then each LLM: (model type, width, layers, heads, KV heads, FFN, vocabulary incl. the
# InternVL tokens; + [SEG] + [REJ] below). 1B: Qwen2.5-0.5B; 8B: InternLM2.5-7B as a transformers "llama" config
# (InternLM2's fused wqkv holds the same weights as separate q / k / v projections: same FLOPs).
VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              image_size=448, patch_size=14)
LLMS = {
    "1b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, intermediate_size=4864, vocab_size=151674, rope_theta=1000000.0,
               rms_norm_eps=1e-6),
    "8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=14336, vocab_size=92553, rope_theta=1000000.0,
               rms_norm_eps=1e-5),
}
TINY_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   image_size=112, patch_size=14)
TINY_LLM = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=0, rms_norm_eps=1e-6)


def real_config(tokenizer, size: str, attn_implementation: str | None = None) -> MLLMSegConfig:
    """The MLLMSeg config of InternVL2.5-`size` ("1b", "8b", or "tiny" for tests) with the tokenizer's token ids."""
    vision = TINY_VISION if size == "tiny" else VISION
    text = dict(TINY_LLM if size == "tiny" else LLMS[size])
    text["vocab_size"] = max(text["vocab_size"] + 2, len(tokenizer))  # + [SEG], [REJ]
    text.update(max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = MLLMSegConfig(vision_config=InternVLVisionConfig(**vision), text_config=text,
                           **token_id_fields(tokenizer), tie_word_embeddings=False, max_dynamic_tiles=12)
    if attn_implementation:
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
    return config


def _recompute_buffers(model: torch.nn.Module):
    """Buffers `to_empty` left uninitialised, recomputed; any buffer of an unknown kind is an error."""
    for name, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if "RotaryEmbedding" in type(module).__name__:
            # Recomputed in float32 and set as new buffers: `.to(bfloat16)` turned them bf16 (from_pretrained keeps
            # them float32). Older transformers name the function `rope_init_fn(config, device)`.
            init_fn = getattr(module, "rope_init_fn", None)
            inv_freq, scaling = (init_fn(module.config, None) if init_fn is not None
                                 else module.compute_default_rope_parameters(module.config))
            inv_freq = inv_freq.to(device=module.inv_freq.device, dtype=torch.float32)
            module.inv_freq = inv_freq
            if "original_inv_freq" in own:
                module.original_inv_freq = inv_freq.clone()
            module.attention_scaling = scaling
        elif isinstance(module, DySampleUpsampler):
            module.init_pos.copy_(module.initial_positions())
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
        else:
            raise RuntimeError(f"no cheap init for the buffers {sorted(own)} of {name} ({type(module).__name__})")


@torch.no_grad()
def random_model(config: MLLMSegConfig, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A random `MLLMSegForConditionalGeneration` of `config` in `dtype` on `device`, in eval mode, built without
    transformers' (slow, fp32) initialisation: meta device, `to_empty`, then normal(0, 0.02) matrices, unit norm
    weights, zero biases, layer scales 0.1."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MLLMSegForConditionalGeneration(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("lambda_"):
            param.fill_(0.1)
        elif param.dim() == 1 and ("norm" in name or leaf == "weight"):
            param.fill_(1.0)
        elif param.dim() == 1:
            param.zero_()
        else:
            param.normal_(0.0, 0.02)
    _recompute_buffers(model)
    return model.eval()


def real_model(size: str, dtype=torch.bfloat16, device="cpu", attn_implementation: str | None = None):
    """(model, processor with the default InternVL system message, tokenizer) at the real `size`."""
    tokenizer = build_tiny_tokenizer()
    config = real_config(tokenizer, size, attn_implementation)
    model = random_model(config, dtype=dtype, device=device)
    processor = build_processor(tokenizer, model.config)  # system_message=None: the InternVL2.5 default
    return model, processor, tokenizer


# -- FLOPs ------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """What one forward processes: tiles (ViT inputs), LLM tokens per sample, masks ([SEG]) and the tiles each
    mask is decoded on, and how many rows the LM head is applied to."""
    tiles: int
    seq_lens: list[int]
    masks: int
    mask_tiles: int  # sum over masks of the grid tiles it is decoded on (the thumbnail is not decoded)
    fused_tiles: int  # tiles whose image fusion runs (once each)
    lm_rows: int


def vit_flops(vision, tiles: int) -> float:
    d, f, layers = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    grid = size // patch
    n = grid * grid + 1  # + CLS
    embed = 2 * grid * grid * 3 * patch * patch * d
    per_layer = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * f
    return tiles * (embed + layers * per_layer)


def projector_flops(config: MLLMSegConfig, tiles: int) -> float:
    d_in = config.vision_config.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
    t = config.text_config.hidden_size
    return tiles * config.tokens_per_tile * 2 * (d_in * t + t * t)


def llm_flops(text, seq_lens: list[int]) -> float:
    """Prefill of the decoder layers (no LM head) over samples of the given lengths, causal attention."""
    t, f, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or t // text.num_attention_heads
    q_dim, kv_dim = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    total = 0.0
    for length in seq_lens:
        proj = 2 * length * t * (2 * q_dim + 2 * kv_dim)  # q, o + k, v
        attn = 2 * 2 * (length * (length + 1) / 2) * q_dim  # QK^T and AV over the causal triangle
        mlp = 3 * 2 * length * t * f
        total += layers * (proj + attn + mlp)
    return total


def lm_head_flops(text, rows: int) -> float:
    return 2 * rows * text.hidden_size * text.vocab_size


def decoder_flops(config: MLLMSegConfig, fused_tiles: int, mask_tiles: int) -> dict[str, float]:
    """DSFF decoder: image fusion once per fused tile, the `[SEG]`-dependent head once per (mask, tile)."""
    d, t = config.vision_config.hidden_size, config.text_config.hidden_size
    f = config.decoder_ffn_dim or d
    n, m = config.vision_grid ** 2, config.tokens_per_tile  # queries (G*G), LLM image tokens (g*g)
    p = config.patch_size
    self_attn = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
    cross = 2 * n * d * d + 2 * m * d * 2 * d + 2 * 2 * n * m * d + 2 * n * d * d
    ffn = 2 * 2 * n * d * f
    offset = 2 * m * d * (2 * config.upsampler_groups * 4)
    fusion = 2 * m * t * d + self_attn + cross + ffn + offset + 2 * n * 3 * d * d + self_attn
    # Per mask: text_down, the one-key cross-attention (value projection and out_proj of its one row, expanded to the
    # G*G queries afterwards), FFN, conv1 (3x3, D -> P*P), conv2 (5x5 on S x S).
    head = 2 * t * d + 2 * d * d + 2 * d * d + ffn + 2 * n * d * p * p * 9 + 2 * 25 * (n * p * p)
    return {"fusion": fused_tiles * fusion, "head": mask_tiles * head}


def stage_flops(config: MLLMSegConfig, work: Workload) -> dict[str, float]:
    dec = decoder_flops(config, work.fused_tiles, work.mask_tiles)
    return {
        "vit": vit_flops(config.vision_config, work.tiles),
        "projector": projector_flops(config, work.tiles),
        "llm": llm_flops(config.text_config, work.seq_lens),
        "lm_head": lm_head_flops(config.text_config, work.lm_rows),
        "decoder": dec["fusion"] + dec["head"],
    }


def workload_from_batch(config: MLLMSegConfig, batch, lm_rows: int | None = None) -> Workload:
    """The workload of a processor batch (`input_ids`, `attention_mask`, `num_tiles`, `tile_grids`) in fast mode:
    the LM head on one row per sample plus one per slot (`logits_to_keep=1`; one call, `head_logits`)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    seq_lens = attention.sum(1).tolist()
    seg = (ids == config.seg_token_id).sum(1).tolist()
    grids = [int(r) * int(c) for r, c in batch["tile_grids"].tolist()]
    tiles = int(batch["pixel_values"].shape[0])
    return Workload(tiles=tiles, seq_lens=seq_lens, masks=sum(seg),
                    mask_tiles=sum(s * g for s, g in zip(seg, grids)),
                    fused_tiles=sum(g for s, g in zip(seg, grids) if s),
                    lm_rows=len(seq_lens) + sum(seg) if lm_rows is None else lm_rows)


def causal_gap(config: MLLMSegConfig, work: Workload) -> float:
    """FLOPs a full (non-causal) score matrix adds over the causal triangle in the LLM: what a FLOP counter that
    counts attention as dense sees on top of [`llm_flops`]."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q_dim = text.num_attention_heads * head_dim
    return sum(2 * 2 * (n * n - n * (n + 1) / 2) * q_dim for n in work.seq_lens) * text.num_hidden_layers


def counted_flops(model, processor, image, expressions, tiling: str) -> dict[str, float]:
    """FLOPs per stage of one `segment` call as `torch.utils.flop_counter` counts them while it runs (the check of
    [`stage_flops`]). The counter has no formula for CPU flash attention, so one is registered (dense scores). The
    decoder's methods are not module calls: its FLOPs are the model's minus the counted modules'."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}
    with FlopCounterMode(display=False, depth=3, custom_mapping=mapping) as counter:
        model.segment(processor, image, expressions, tiling=tiling)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    counted = {"vit": counts.get(f"{root}.model.vision_tower", 0),
               "projector": counts.get(f"{root}.model.multi_modal_projector", 0),
               "llm": counts.get(f"{root}.model.language_model", 0), "lm_head": counts.get(f"{root}.lm_head", 0)}
    counted["decoder"] = counts.get(root, 0) - sum(counted.values())
    return counted


def matmul_rate(dtype=torch.bfloat16, device="cpu", n: int = 2048, seconds: float = 1.0, clock=None) -> float:
    """Sustained FLOP/s of `torch.matmul` on two `[n, n]` matrices of `dtype`, repeated for about `seconds` after a
    warm-up. `clock`: the timer (default `time.perf_counter`, with a device synchronise on CUDA)."""
    import time

    clock = clock or time.perf_counter
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        torch.matmul(a, b)
    sync()
    reps, start = 0, clock()
    while True:
        for _ in range(4):
            torch.matmul(a, b)
        reps += 4
        sync()
        took = clock() - start
        if took >= seconds:
            return reps * 2 * n**3 / took


def gflop(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


__all__ = ["real_config", "random_model", "real_model", "Workload", "stage_flops", "workload_from_batch",
           "matmul_rate", "counted_flops", "causal_gap", "vit_flops", "llm_flops", "lm_head_flops", "decoder_flops", "projector_flops"]
