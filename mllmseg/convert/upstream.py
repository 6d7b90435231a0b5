"""Convert original-layout InternVL / MLLMSeg checkpoints into this package's remote-code checkpoints.

Two entry points:

* `convert_upstream(src, dst)`: a released MLLMSeg checkpoint (`MLLMSeg_InternVL2_5_*`, the layout of the reference
  repository: an `InternVLChatConfig` `config.json` and keys `vision_model.*`, `mlp1.*`, `language_model.*`,
  `res_decoder.*`) -> an `MLLMSegForConditionalGeneration` checkpoint (+ tokenizer and processor).
* `convert_internvl(src, dst)`: an original-layout InternVL2.5 / InternVL3 base (same layout, no `res_decoder`) -> a
  base ready for training: `[SEG]` / `[REJ]` added with the rows of new tokens at the mean of the old ones and the
  mask decoder at the reference initialisation, as `mllmseg.base_checkpoint.from_internvl` does for `-hf` bases.

Key mapping (source -> ours; every key must match one rule, else ValueError listing the unmatched names; every
weight of our model must be produced, else ValueError listing the missing ones; shapes are checked too):

* ViT (`vision_model.` -> `model.vision_tower.`): `embeddings.class_embedding -> embeddings.cls_token`,
  `embeddings.position_embedding -> embeddings.position_embeddings`, `embeddings.patch_embedding ->
  embeddings.patch_embeddings.projection`, `encoder.layers.N -> encoder.layer.N`, `attn.qkv` -> thirds
  `attention.{q,k,v}_proj`, `attn.proj -> attention.projection_layer`, `attn.{q,k}_norm -> attention.{q,k}_norm`,
  `mlp.fc1/fc2` kept, `norm1/norm2 -> layernorm_before/after`, `ls1/ls2 -> lambda_1/lambda_2`.
* Projector: `mlp1.{0,1,3} -> model.multi_modal_projector.{layer_norm,linear_1,linear_2}`.
* InternLM2 (-> a Llama text model): `model.tok_embeddings -> embed_tokens`, `attention.wqkv` split from its
  grouped layout `[kv_heads, (groups q heads, 1 k head, 1 v head), head_dim]` into `self_attn.{q,k,v}_proj`
  (weight and bias), `attention.wo -> self_attn.o_proj`, `feed_forward.w1/w3/w2 -> mlp.gate/up/down_proj`,
  `attention_norm/ffn_norm -> input/post_attention_layernorm`, `output -> lm_head` (kept untied).
* Qwen2 / Llama LLMs: `language_model.model.* -> model.language_model.*`, `language_model.lm_head -> lm_head`.
* Decoder: `res_decoder.* -> mask_decoder.*`, with `ca_layer_X.decoder.{layers,norm}.* -> ca_layer_X.{layers,norm}.*`.
* PEFT LoRA (unmerged): `<lm>.base_model.model.` / `<vit>.base_model.model.` prefixes are dropped and each
  `P.base_layer.weight` + `P.lora_A.default.weight` (A, `[r, in]`) + `P.lora_B.default.weight` (B, `[out, r]`)
  becomes `P.weight = W + scale * B @ A` (computed in float32), before the renaming above (so a fused `wqkv` is
  merged, then split). `scale` is, in this order: the `lora_scale` argument; `lora_alpha / r` (or
  `lora_alpha / sqrt(r)` with `use_rslora`) from an `adapter_config.json` in the source folder; `2.0` when the
  config says `use_llm_lora` / `use_backbone_lora` (the reference always wraps with `lora_alpha = 2 * r`).
  Other adapter names, DoRA magnitudes, LoRA embeddings and `modules_to_save` copies are rejected as unknown keys.
* Dropped silently: non-persistent rotary buffers some old checkpoints carry (`*.rotary_emb.inv_freq`).

Config: `vision_config` (InternVisionConfig: `qkv_bias -> attention_bias`, `qk_normalization -> use_qk_norm`,
`norm_type`, `layer_norm_eps`, `force_image_size` or `image_size`, ... with InternVisionConfig's own defaults where a
field is absent), `llm_config` (InternLM2 -> llama with `rope_theta`, `rope_scaling` (linear/dynamic), `rms_norm_eps`,
`num_key_value_heads`, `bias -> attention_bias`; Qwen2/Llama passed through), `select_layer -> vision_feature_layer`,
`downsample_ratio`; the text vocabulary size is the embedding matrix's row count; token ids come from the tokenizer.
`ps_version` must be `v2` (the pixel shuffle transformers implements; every InternVL2.5 / InternVL3 release uses it).

Files: `model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin` or
`pytorch_model.bin.index.json` (loaded with `torch.load(weights_only=True)`). The whole state dict is held in memory
and, during conversion, an intermediate copy in our names is written next to `dst` (removed afterwards).

Config: a Qwen2 / Llama `llm_config` (a transformers 4.37 `to_dict()` dump in the releases) keeps only the fields the
transformers config class takes; `bos/eos/pad_token_id` come from the tokenizer (a Qwen2 dump says bos 151643 although
the tokenizer has no BOS).

Tokenizer: never through `AutoTokenizer` (every OpenGVLab / MLLMSeg release names its own classes in `auto_map`, so it
would ask to run them), or given (`tokenizer=` object or folder, CLI `--tokenizer`). A `tokenizer.json` is read as a
fast tokenizer; a sentencepiece `tokenizer.model` alone (InternLM2-based releases: InternVL2.5-2B/8B and their MLLMSeg
releases) is converted to a fast tokenizer here ([`fast_tokenizer_from_sentencepiece`], needs the
`mllmseg[sentencepiece]` extra: sentencepiece and protobuf); `vocab.json` + `merges.txt` alone (a Qwen2 release saved
by the slow tokenizer) is rebuilt by transformers' `Qwen2Tokenizer`. The source's python files are never executed.

Checked by tests/test_convert_layouts.py on tiny checkpoints built from descriptions of the published layouts
(tests/fixtures/published_layouts/, with provenance), against an independent forward of the source weights (LLM
logits, InternLM2's dynamic-NTK rope included; mask probabilities through torch's own TransformerDecoderLayer).
Not checked against real released files (nothing can be downloaded here): the exact file sets and the few fields
PROVENANCE.md lists as inferred, the InternViT-6B `q_norm/k_norm` epsilon (transformers' InternVL RMSNorm uses its
default 1e-6, the reference `layer_norm_eps`, also 1e-6 in the releases we know of), and Qwen2 `rope_scaling`, which
transformers 4.37 (the reference's version) ignores while transformers 5 applies it past `max_position_embeddings`.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
PEFT_PREFIXES = {
    "language_model.base_model.model.": "language_model.",
    "vision_model.base_model.model.": "vision_model.",
}
IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
SUPPORTED_LLMS = ("InternLM2ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")

# InternVisionConfig's defaults (reference `configuration_intern_vit.py`), used where a config omits a field.
_VIT_DEFAULTS = dict(
    num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200, num_attention_heads=25,
    intermediate_size=12800, qk_normalization=True, num_hidden_layers=48, hidden_act="gelu", norm_type="rms_norm",
    layer_norm_eps=1e-6, dropout=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1,
)
# Fields of a transformers config's __init__ that describe the saved file or the runtime, not the model: a released
# llm_config (a transformers 4.37 `to_dict()`) carries them with stale values, so they are not carried over.
_GENERIC_CONFIG_FIELDS = ("transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
                          "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
                          "use_cache", "bos_token_id", "eos_token_id", "pad_token_id")


# ---------------------------------------------------------------------------------------------------------------
# Reading the source
# ---------------------------------------------------------------------------------------------------------------
def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_source_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an original-layout checkpoint folder (single file or sharded, safetensors or `.bin`)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a checkpoint folder")
    for name in WEIGHT_FILES:
        path = src / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (src / shard).is_file():
                    raise FileNotFoundError(f"{src / shard}: shard listed in {name} is missing")
                state.update(_load_file(src / shard))
            absent = sorted(set(weight_map) - set(state))
            if absent:
                raise ValueError(f"{name} lists tensors its shards do not hold: {absent[:20]}")
            return state
        return _load_file(path)
    raise FileNotFoundError(f"{src}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def load_source_config(src: str | Path) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    config = json.loads(path.read_text())
    for field in ("vision_config", "llm_config"):
        if not isinstance(config.get(field), dict):
            raise ValueError(f"{path}: not an InternVL chat config (no {field!r}); for InternVL '-hf' checkpoints use "
                             "mllmseg.base_checkpoint.from_internvl")
    arch = (config["llm_config"].get("architectures") or [None])[0]
    if arch not in SUPPORTED_LLMS:
        raise ValueError(f"{path}: llm_config architecture {arch!r} is not supported (supported: {SUPPORTED_LLMS})")
    if config.get("template", "internvl2_5") != "internvl2_5":
        raise ValueError(f"{path}: template {config['template']!r}: MLLMSeg's processor renders the 'internvl2_5' chat "
                         "format only; converting would prompt the model in a format it was not trained with")
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(f"{path}: ps_version {config.get('ps_version', 'v1')!r}: only the 'v2' pixel shuffle (that of "
                         "transformers' InternVL and of all InternVL2.5/3 releases) is supported")
    return config


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------
def _lora_scales(src: Path, config: dict, lora_scale: float | None) -> dict[str, float | None]:
    """Scale per component prefix ('language_model.', 'vision_model.')."""
    if lora_scale is not None:
        return {"language_model.": float(lora_scale), "vision_model.": float(lora_scale)}
    adapter = src / "adapter_config.json"
    if adapter.is_file():
        cfg = json.loads(adapter.read_text())
        r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        return {"language_model.": scale, "vision_model.": scale}
    # The reference wraps with lora_alpha = 2 * r (InternVLChatModel.wrap_llm_lora / wrap_backbone_lora).
    return {
        "language_model.": 2.0 if config.get("use_llm_lora") else None,
        "vision_model.": 2.0 if config.get("use_backbone_lora") else None,
    }


def merge_lora_weights(state: dict[str, torch.Tensor], scales: dict[str, float | None] | float) -> dict[str, torch.Tensor]:
    """Strip PEFT wrapper prefixes and fold `base_layer` + `lora_A/B.default` into plain weights: W + scale * B @ A.

    `scales`: one float, or a float (or None: "no scale known") per component prefix after stripping.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in PEFT_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    bases = [k[: -len(".base_layer.weight")] for k in out if k.endswith(".base_layer.weight")]
    for prefix in bases:
        a_key, b_key = f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"
        if a_key not in out or b_key not in out:
            raise ValueError(f"LoRA-wrapped {prefix!r} lacks {a_key if a_key not in out else b_key!r}")
        if isinstance(scales, (int, float)):
            scale = float(scales)
        else:
            scale = next((s for p, s in scales.items() if prefix.startswith(p)), None)
        if scale is None:
            raise ValueError(f"{prefix!r} holds unmerged LoRA weights but no scale is known: give lora_scale "
                             "(lora_alpha / r) or put the adapter_config.json in the source folder")
        base = out.pop(f"{prefix}.base_layer.weight")
        a, b = out.pop(a_key), out.pop(b_key)
        if a.shape[0] != b.shape[1] or b.shape[0] != base.shape[0] or a.shape[1] != base.shape[1]:
            raise ValueError(f"{prefix!r}: LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit W{tuple(base.shape)}")
        out[f"{prefix}.weight"] = (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
        if f"{prefix}.base_layer.bias" in out:
            out[f"{prefix}.bias"] = out.pop(f"{prefix}.base_layer.bias")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fused projections
# ---------------------------------------------------------------------------------------------------------------
def split_internlm2_wqkv(
    tensor: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused `wqkv` (weight `[(H + 2K) d, in]` or bias `[(H + 2K) d]`) -> q `[H d, ...]`, k, v `[K d, ...]`.

    The rows are laid out `[K, (H/K q heads, 1 k head, 1 v head), d]`; query head `h * (H/K) + g` is group `g`
    of kv head `h` (the reference's `rearrange('b q (h gs d) -> b q h gs d')` then `(h gs)`).
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    groups = num_heads // num_kv_heads
    expected = (num_heads + 2 * num_kv_heads) * head_dim
    if tensor.shape[0] != expected:
        raise ValueError(f"wqkv has {tensor.shape[0]} rows, expected (heads {num_heads} + 2 x kv heads {num_kv_heads}) "
                         f"x head_dim {head_dim} = {expected}")
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def split_vit_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternViT's `attn.qkv` (`[3 D, ...]`, laid out `(three, heads, head_dim)`) -> q, k, v thirds."""
    if tensor.shape[0] % 3:
        raise ValueError(f"attn.qkv has {tensor.shape[0]} rows, not a multiple of 3")
    return tuple(t.contiguous() for t in tensor.chunk(3, dim=0))


# ---------------------------------------------------------------------------------------------------------------
# Renaming
# ---------------------------------------------------------------------------------------------------------------
_VIT = "model.vision_tower."
_LM = "model.language_model."
# (source pattern, target template or a split marker); applied with re.fullmatch, first match wins.
_COMMON_RULES = [
    (r"vision_model\.embeddings\.class_embedding", _VIT + "embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", _VIT + "embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", _VIT + r"embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", ("vit_qkv", _VIT + r"encoder.layer.\1.attention.{}_proj.\2")),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)", _VIT + r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)", _VIT + r"encoder.layer.\1.attention.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", _VIT + r"encoder.layer.\1.mlp.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)", _VIT + r"encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)", _VIT + r"encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1", _VIT + r"encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2", _VIT + r"encoder.layer.\1.lambda_2"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"res_decoder\.(ca_layer_v2l|ca_layer_vl)\.decoder\.(layers\.\d+|norm)\.(.+)", r"mask_decoder.\1.\2.\3"),
    (r"res_decoder\.(img_llm_down|text_down|text_out_adapter|conv2)\.(weight|bias)", r"mask_decoder.\1.\2"),
    (r"res_decoder\.upsample_adapter_l\.(offset\.weight|offset\.bias|init_pos)", r"mask_decoder.upsample_adapter_l.\1"),
    (r"res_decoder\.conv1\.([01])\.(weight|bias|running_mean|running_var|num_batches_tracked)", r"mask_decoder.conv1.\1.\2"),
]
_INTERNLM2_RULES = [
    (r"language_model\.model\.tok_embeddings\.weight", _LM + "embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", _LM + "norm.weight"),
    (r"language_model\.output\.weight", "lm_head.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)", ("wqkv", _LM + r"layers.\1.self_attn.{}_proj.\2")),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.(weight|bias)", _LM + r"layers.\1.self_attn.o_proj.\2"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight", _LM + r"layers.\1.mlp.gate_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight", _LM + r"layers.\1.mlp.up_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight", _LM + r"layers.\1.mlp.down_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight", _LM + r"layers.\1.input_layernorm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight", _LM + r"layers.\1.post_attention_layernorm.weight"),
]
_HF_LLM_RULES = [
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
    (r"language_model\.model\.(.+)", _LM + r"\1"),
]


def convert_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Original-layout tensors (LoRA already merged) -> this model's names. Unknown keys raise a ValueError."""
    llm = config["llm_config"]
    arch = llm["architectures"][0]
    rules = _COMMON_RULES + (_INTERNLM2_RULES if arch == "InternLM2ForCausalLM" else _HF_LLM_RULES)
    compiled = [(re.compile(p), t) for p, t in rules]
    heads = llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads") or heads
    head_dim = llm["hidden_size"] // heads
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if IGNORED_KEYS.fullmatch(key):
            continue
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if isinstance(target, tuple):
                kind, template = target
                parts = split_vit_qkv(value) if kind == "vit_qkv" else split_internlm2_wqkv(value, heads, kv_heads, head_dim)
                for name, part in zip("qkv", parts):
                    out[match.expand(template.format(name))] = part
            else:
                out[match.expand(target)] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} unknown key(s) in the source checkpoint: {sorted(unknown)[:50]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
def _vision_config(config: dict):
    from transformers import InternVLVisionConfig

    vit = {**_VIT_DEFAULTS, **config["vision_config"]}
    image_size = config.get("force_image_size") or vit["image_size"]
    return InternVLVisionConfig(
        hidden_size=vit["hidden_size"],
        num_hidden_layers=vit["num_hidden_layers"],
        num_attention_heads=vit["num_attention_heads"],
        intermediate_size=vit["intermediate_size"],
        hidden_act=vit["hidden_act"],
        attention_bias=bool(vit["qkv_bias"]),
        use_qk_norm=bool(vit["qk_normalization"]),
        norm_type=vit["norm_type"],
        layer_norm_eps=vit["layer_norm_eps"],
        image_size=image_size,
        patch_size=vit["patch_size"],
        num_channels=vit["num_channels"],
        attention_dropout=vit["attention_dropout"],
        projection_dropout=vit["dropout"],
        hidden_dropout_prob=0.0,
        layer_scale_init_value=vit["initializer_factor"],
        initializer_range=vit["initializer_range"],
        use_mean_pooling=True,  # InternViT has no final LayerNorm
        use_absolute_position_embeddings=True,
        use_mask_token=False,
    )


def _known_text_fields(llm: dict, model_type: str) -> dict:
    """A Qwen2 / Llama llm_config reduced to the fields transformers' config class of `model_type` takes (its
    `__init__` parameters, plus the legacy `rope_theta` / `rope_scaling` it still converts), generic ones aside.
    Everything else a 4.37-era dump holds (`_name_or_path`, `attn_implementation`, `use_flash_attn`, `use_bfloat16`,
    generation defaults such as `top_k`, `moe_config`, ...) is dropped."""
    import inspect

    from transformers import AutoConfig

    accepted = set(inspect.signature(type(AutoConfig.for_model(model_type)).__init__).parameters)
    accepted = (accepted | {"rope_theta", "rope_scaling"}) - {"self", "kwargs", *_GENERIC_CONFIG_FIELDS}
    text = {k: v for k, v in llm.items() if k in accepted}
    if text.get("rope_scaling") is None:
        text.pop("rope_scaling", None)
    text["model_type"] = model_type
    return text


def _text_config(llm: dict, vocab_rows: int, special_ids: dict | None = None) -> dict:
    """The `text_config` dict of an llm_config; `special_ids`: `bos/eos/pad_token_id` to set (from the tokenizer:
    a Qwen2 llm_config says bos 151643 although the tokenizer has no BOS)."""
    arch = llm["architectures"][0]
    if arch == "InternLM2ForCausalLM":
        heads = llm["num_attention_heads"]
        text = dict(
            model_type="llama",
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=llm.get("num_key_value_heads") or heads,
            head_dim=llm["hidden_size"] // heads,
            hidden_act=llm.get("hidden_act", "silu"),
            max_position_embeddings=llm.get("max_position_embeddings", 2048),
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
            rope_theta=llm.get("rope_theta", 10000),
            attention_bias=bool(llm.get("bias", True)),
            mlp_bias=False,
            bos_token_id=llm.get("bos_token_id", 1),
            eos_token_id=llm.get("eos_token_id", 2),
            pad_token_id=llm.get("pad_token_id", 0),
        )
        scaling = llm.get("rope_scaling")
        if scaling:
            kind = scaling.get("type") or scaling.get("rope_type")
            if kind not in ("linear", "dynamic"):
                raise ValueError(f"InternLM2 rope_scaling type {kind!r} is not supported (linear, dynamic)")
            text["rope_scaling"] = {"type": kind, "rope_type": kind, "factor": float(scaling["factor"])}
    else:
        text = _known_text_fields(llm, "qwen2" if arch == "Qwen2ForCausalLM" else "llama")
    text["vocab_size"] = vocab_rows
    text.update(special_ids or {})
    text["tie_word_embeddings"] = False  # InternVLChatConfig forces untied embeddings
    return text


def build_config(config: dict, tokenizer, vocab_rows: int, decoder_ffn_dim: int | None = None,
                 new_ids: tuple[int, ...] = (), **overrides):
    """`MLLMSegConfig` from an InternVL chat config dict and the tokenizer's ids (`new_ids`: ids of tokens just added,
    whose embedding rows are grown after loading, so they may lie beyond `vocab_rows`)."""
    from ..remote_code.configuration_mllmseg import MLLMSegConfig, token_id_fields

    ids = token_id_fields(tokenizer)
    too_big = {t: i for t, i in ids.items() if i >= vocab_rows and i not in new_ids}
    if too_big:
        raise ValueError(f"token ids {too_big} are outside the {vocab_rows}-row embedding: wrong tokenizer?")
    vision_config = _vision_config(config)
    width = vision_config.hidden_size
    return MLLMSegConfig(
        vision_config=vision_config,
        text_config=_text_config(config["llm_config"], vocab_rows, special_ids={
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}),
        downsample_ratio=config.get("downsample_ratio", 0.5),
        vision_feature_layer=config.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **ids,
        decoder_ffn_dim=None if decoder_ffn_dim in (None, width) else decoder_ffn_dim,
        tie_word_embeddings=False,
        **({"max_dynamic_tiles": int(config["max_dynamic_patch"])} if "max_dynamic_patch" in config else {}) | overrides,
    )


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def _load_tokenizer(src: Path, tokenizer):
    """The source's tokenizer as a fast tokenizer, never through remote code: every OpenGVLab / MLLMSeg release
    names its own tokenizer classes in `auto_map` (`AutoTokenizer` would ask to run them). A `tokenizer.json` is read
    as it is (special and added tokens from `tokenizer_config.json`); a sentencepiece `tokenizer.model` alone (the
    InternLM2-based releases) is converted here, see [`fast_tokenizer_from_sentencepiece`]."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    where = Path(tokenizer) if tokenizer is not None else src
    if (where / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(where)
    if (where / "tokenizer.model").is_file():
        return fast_tokenizer_from_sentencepiece(where)
    if (where / "vocab.json").is_file() and (where / "merges.txt").is_file():
        return _qwen2_tokenizer_from_vocab(where)
    raise ValueError(f"{where} has no tokenizer.json (a fast tokenizer), tokenizer.model (sentencepiece) or "
                     "vocab.json + merges.txt (Qwen2): pass a folder holding the release's tokenizer with "
                     "tokenizer=/--tokenizer")


def _qwen2_tokenizer_from_vocab(folder: Path):
    """A Qwen2 release saved by the slow tokenizer (vocab.json + merges.txt, no tokenizer.json): transformers' own
    `Qwen2Tokenizer` (no remote code) rebuilds it with Qwen2's pre-tokenizer; other BPE families are refused, since
    their pre-tokenization is not known here."""
    from transformers import Qwen2Tokenizer

    config_path = folder / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
    if declared not in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise ValueError(f"{config_path}: tokenizer_class {declared!r} with vocab.json + merges.txt and no "
                         "tokenizer.json; only Qwen2 tokenizers are rebuilt from those files: pass a folder holding a "
                         "tokenizer.json with tokenizer=/--tokenizer")
    return Qwen2Tokenizer.from_pretrained(folder)


def _require_sentencepiece(model_file: Path) -> None:
    """transformers reads a sentencepiece model with the `sentencepiece` package and its protobuf schema."""
    missing = []
    for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ValueError(
            f"{model_file} is a sentencepiece model; turning it into a fast tokenizer needs {' and '.join(missing)}: "
            "pip install mllmseg[sentencepiece], or pass a folder holding a tokenizer.json with --tokenizer "
            "(tokenizer= in Python)"
        )


def fast_tokenizer_from_sentencepiece(folder: str | Path):
    """A fast tokenizer built locally from `folder/tokenizer.model` (sentencepiece) and the folder's
    `tokenizer_config.json` / `special_tokens_map.json` (added tokens at their ids, BOS / EOS / PAD, `add_bos_token`),
    without the release's remote-code tokenizer class.

    It follows the sentencepiece model's own settings (BPE merges by piece score, byte fallback, dummy prefix,
    whitespace handling, user-defined pieces kept whole), so it encodes as `SentencePieceProcessor.encode` does on
    the text between added tokens. The one place that touches transformers' sentencepiece conversion:
    `TokenizersBackend.from_pretrained` converts a `tokenizer.model` when no `tokenizer.json` is present (public
    class; the conversion itself is transformers' `convert_slow_tokenizer.SpmConverter`). Every added token of
    `tokenizer_config.json` is checked to keep its id.
    """
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: missing")
    _require_sentencepiece(model_file)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(folder, vocab_file=str(model_file))
    except Exception as error:  # transformers falls back to reading it as tiktoken, which then fails obscurely
        raise ValueError(f"{model_file}: the sentencepiece model could not be converted to a fast tokenizer ({error}); "
                         "check the sentencepiece / protobuf versions (pip install mllmseg[sentencepiece]) or pass a "
                         "folder holding a tokenizer.json with --tokenizer") from error
    _check_against_sentencepiece(tok, model_file)
    config_path = folder / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()).get("added_tokens_decoder", {}) if config_path.is_file() else {}
    vocab = tok.get_vocab()
    wrong = {entry["content"]: (int(i), vocab.get(entry["content"])) for i, entry in declared.items()
             if vocab.get(entry["content"]) != int(i)}
    if wrong:
        raise ValueError(f"{config_path}: added tokens changed ids in the sentencepiece conversion "
                         f"(token: (declared, got)): {dict(list(wrong.items())[:20])}")
    return tok


# Plain text (no added token) on which the converted tokenizer must encode exactly as sentencepiece does.
SENTENCEPIECE_PROBES = ("Hello world", " leading space", "two  spaces\tand\nlines", "The red circle is 12345",
                        "每个人都有权享受教育。", "café ∑ ü 😀")


def _check_against_sentencepiece(tok, model_file: Path) -> None:
    """Refuse a conversion that does not encode like the sentencepiece model itself (some transformers releases
    drop the model's dummy prefix, for one): a tokenizer that silently splits text differently would give the
    converted model other inputs than the ones it was trained on."""
    import sentencepiece
    import transformers

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    for probe in SENTENCEPIECE_PROBES:
        want, got = sp.encode(probe), tok(probe, add_special_tokens=False)["input_ids"]
        if got != want:
            raise ValueError(
                f"{model_file}: transformers {transformers.__version__}'s sentencepiece conversion does not reproduce "
                f"this model ({probe!r}: {got[:8]} instead of {want[:8]}); use a newer transformers, or pass a folder "
                "holding the release's tokenizer.json with --tokenizer"
            )


def _restore_dtypes(model, weights: Path, dtypes: dict) -> None:
    """Give the parameters and buffers named in `dtypes` their source dtype and exact source values."""
    from safetensors import safe_open

    if not dtypes:
        return
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with safe_open(str(weights), "pt") as f, torch.no_grad():
        for key, dtype in dtypes.items():
            tensors[key].data = f.get_tensor(key).to(dtype)


def _check_keys(converted: dict[str, torch.Tensor], config, allow_missing_prefix: str | None) -> None:
    from ..remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

    with torch.device("meta"):
        reference = MLLMSegForConditionalGeneration(config).state_dict()
    missing = sorted(k for k in reference if k not in converted
                     and not (allow_missing_prefix and k.startswith(allow_missing_prefix)))
    unexpected = sorted(k for k in converted if k not in reference)
    if unexpected and allow_missing_prefix:
        unexpected_decoder = [k for k in unexpected if k.startswith(allow_missing_prefix)]
        if unexpected_decoder:
            raise ValueError(f"the base checkpoint already has mask-decoder weights ({unexpected_decoder[:5]}...): "
                             "use convert_upstream / convert-upstream")
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the model: missing {missing[:50]}, unexpected {unexpected[:50]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(reference[k].shape)}" for k, v in converted.items()
           if tuple(v.shape) != tuple(reference[k].shape)]
    if bad:
        raise ValueError(f"shape mismatches: {bad[:20]}")


def _convert(src, dst, *, tokenizer, lora_scale, base: bool, **overrides):
    import mllmseg  # noqa: F401 - registers the auto classes (remote-code save)
    from safetensors.torch import save_file

    from ..base_checkpoint import add_mllmseg_tokens, init_new_token_rows, set_chat_generation_defaults
    from ..remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration
    from ..remote_code.processing_mllmseg import MLLMSegProcessor

    src, dst = Path(src), Path(dst)
    config = load_source_config(src)
    tok = _load_tokenizer(src, tokenizer)
    state = merge_lora_weights(load_source_state_dict(src), _lora_scales(src, config, lora_scale))
    has_decoder = any(k.startswith("res_decoder.") for k in state)
    if base and has_decoder:
        raise ValueError(f"{src} holds res_decoder.* weights: it is an MLLMSeg checkpoint, use convert_upstream")
    if not base and not has_decoder:
        raise ValueError(f"{src} has no res_decoder.* weights: it is a base InternVL checkpoint, use convert_internvl")
    converted = convert_state_dict(state, config)
    del state
    embed = converted.get(_LM + "embed_tokens.weight")
    if embed is None:
        raise ValueError("the source has no token embedding (language_model.model.tok_embeddings / embed_tokens)")
    vocab_rows = embed.shape[0]
    new_ids = add_mllmseg_tokens(tok) if base else []
    ffn = converted.get("mask_decoder.ca_layer_vl.layers.0.linear1.weight")
    model_config = build_config(config, tok, vocab_rows, None if ffn is None else ffn.shape[0], tuple(new_ids),
                                **overrides)
    dtype = Counter(v.dtype for v in converted.values() if v.is_floating_point()).most_common(1)[0][0]
    # Tensors stored in another float dtype than most (an fp16 decoder in a bf16 release) keep theirs.
    other_dtypes = {k: v.dtype for k, v in converted.items() if v.is_floating_point() and v.dtype != dtype}
    _check_keys(converted, model_config, "mask_decoder." if base else None)

    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".mllmseg-convert-") as tmp:
        model_config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in converted.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        del converted
        model = MLLMSegForConditionalGeneration.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        _restore_dtypes(model, Path(tmp) / "model.safetensors", other_dtypes)
    if base:
        init_new_token_rows(model, new_ids, old_rows=vocab_rows)
        model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.eval()
    set_chat_generation_defaults(model, tok)
    model.save_pretrained(dst)
    # BOS as the source's tokenizer family has it (InternLM2: <s> first, as the reference prompts; Qwen2: none).
    processor = MLLMSegProcessor.for_model_config(tok, model.config)
    processor.save_pretrained(dst)
    return dst


def convert_upstream(src: str | Path, dst: str | Path, *, tokenizer=None, lora_scale: float | None = None,
                     **config_overrides) -> Path:
    """Convert a released MLLMSeg checkpoint (reference layout, see the module docstring) into a remote-code
    checkpoint at `dst` (model, tokenizer, processor). `tokenizer`: a tokenizer or folder to use instead of the
    source's; `lora_scale`: alpha / r for unmerged LoRA weights; `config_overrides`: `MLLMSegConfig` fields."""
    return _convert(src, dst, tokenizer=tokenizer, lora_scale=lora_scale, base=False, **config_overrides)


def convert_internvl(src: str | Path, dst: str | Path, *, tokenizer=None, lora_scale: float | None = None,
                     **config_overrides) -> Path:
    """Convert an original-layout InternVL2.5 / InternVL3 base into an MLLMSeg checkpoint ready for training:
    every base weight kept, `[SEG]` / `[REJ]` added (new token rows at the mean of the old ones), the mask decoder at
    the reference initialisation."""
    return _convert(src, dst, tokenizer=tokenizer, lora_scale=lora_scale, base=True, **config_overrides)


__all__ = [
    "convert_upstream", "convert_internvl", "convert_state_dict", "merge_lora_weights", "split_internlm2_wqkv",
    "split_vit_qkv", "load_source_state_dict", "load_source_config", "build_config", "fast_tokenizer_from_sentencepiece",
]
