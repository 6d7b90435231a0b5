"""Published checkpoint layouts -> ours, checked against an independent forward of the source weights.

Each layout is described in tests/fixtures/published_layouts/ (see PROVENANCE.md there): the release's config.json
field for field (tiny sizes), its state-dict key patterns, its weight files and its tokenizer file set and token ids.
A tiny random checkpoint is built here *from that description* (never from our model), converted with the public
entry points, and compared with a small reference implementation written below from the reference modules
(InternLM2 / Qwen2 decoder with the fused `wqkv` read as the reference's rearrange, InternLM2's dynamic-NTK rope,
MLLMSeg's RESDecoder on torch's own `nn.TransformerDecoderLayer`). The sources' tokenizer files name their own code
(`auto_map`) and a `tokenization_internlm2.py` that would record having run: nothing of the source may execute.
"""
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mllmseg import MLLMSegForConditionalGeneration
from mllmseg.convert import convert_internvl, convert_upstream

sentencepiece = pytest.importorskip("sentencepiece")
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

LAYOUTS = Path(__file__).parent / "fixtures" / "published_layouts"
REPO = Path(__file__).resolve().parents[1]
PROMPT = "<|im_start|>user\nWhere is the red circle on the left?<|im_end|>\n<|im_start|>assistant\nIt is here"


def load_layout(name: str) -> dict:
    return json.loads((LAYOUTS / f"{name}.json").read_text())


# ---- tokenizers in the release conventions ----------------------------------------------------------------------
_TEXT = [f"The {c} {o} number {i} is on the {s} of the image, 红色的圆 {i * 7} 🙂 café"
         for i in range(60) for c, o, s in (("red", "circle", "left"), ("blue", "square", "right"))]
_TEXT += ["每个人都有权享受教育。", "emoji 😀🚀 test", "tabs\tand\nnew lines", "Where is it? It is here."] * 20


def _added(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def write_sentencepiece_tokenizer(folder: Path, layout: dict, add_dummy_prefix: bool = False,
                                  normalization: str = "identity") -> dict[str, int]:
    """InternLM2 convention: a BPE sentencepiece model with byte fallback whose last pieces are the user-defined
    chat tokens, BOS `<s>` = 1, EOS `</s>` = 2, then InternVL's (and MLLMSeg's) added tokens after the model's pieces.
    No dummy prefix and no normalisation by default (newlines survive, as the chat format needs). Returns
    token -> id."""
    spec = layout["tokenizer"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TEXT), model_writer=model, vocab_size=400, hard_vocab_limit=False, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=add_dummy_prefix, character_coverage=0.99, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, remove_extra_whitespaces=False, normalization_rule_name=normalization, split_digits=True, allow_whitespace_only_pieces=True,
        minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    for token in spec["sentencepiece_user_defined"]:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, piece.USER_DEFINED
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    n = len(proto.pieces)
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids.update({t: n - len(spec["sentencepiece_user_defined"]) + i for i, t in enumerate(spec["sentencepiece_user_defined"])})
    ids.update({t: n + i for i, t in enumerate(spec["added_after_sentencepiece"])})
    config = {"add_bos_token": spec["add_bos_token"], "add_eos_token": spec["add_eos_token"],
              "added_tokens_decoder": {str(i): _added(t) for t, i in sorted(ids.items(), key=lambda x: x[1])},
              "additional_special_tokens": spec["additional_special_tokens"], "auto_map": spec["auto_map"],
              "bos_token": spec["bos_token"], "clean_up_tokenization_spaces": spec["clean_up_tokenization_spaces"],
              "eos_token": spec["eos_token"], "model_max_length": spec["model_max_length"],
              "pad_token": spec["pad_token"], "tokenizer_class": spec["tokenizer_class"], "unk_token": spec["unk_token"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": spec["additional_special_tokens"], "bos_token": _added("<s>"),
        "eos_token": _added("</s>"), "pad_token": _added("</s>"), "unk_token": _added("<unk>")}))
    (folder / "added_tokens.json").write_text(json.dumps({t: ids[t] for t in spec["added_after_sentencepiece"]}))
    # The real ids follow the same convention, offset by the model's size (92544 real pieces).
    real, base = spec["token_ids"], spec["sentencepiece_pieces"]
    assert {t: i - (n if i >= n - 6 else 0) for t, i in ids.items()} == \
           {t: i - (base if i >= base - 6 else 0) for t, i in real.items()}
    return ids


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def write_qwen2_tokenizer(folder: Path, layout: dict) -> dict[str, int]:
    """Qwen2 convention: byte-level BPE with Qwen2's pre-tokenizer (vocab.json / merges.txt), no BOS, the Qwen2.5
    special tokens after the BPE ranks, then InternVL's (and MLLMSeg's) tokens; tokenizer.json only where the
    release has one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    spec = layout["tokenizer"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TEXT, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))
    n = bpe.get_vocab_size()
    ids = {t: n + i for i, t in enumerate(spec["added_after_bpe"])}
    special = spec["special"]
    config = {"add_prefix_space": False,
              "added_tokens_decoder": {str(i): _added(t, special.get(t, True)) for t, i in ids.items()},
              "additional_special_tokens": spec["additional_special_tokens"], "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": spec["eos_token"], "errors": "replace",
              "model_max_length": spec["model_max_length"], "pad_token": spec["pad_token"],
              "split_special_tokens": False, "tokenizer_class": spec["tokenizer_class"], "unk_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if "tokenizer.json" in spec["files"]:
        Qwen2Tokenizer.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": spec["additional_special_tokens"], "eos_token": _added(spec["eos_token"]),
        "pad_token": _added(spec["pad_token"])}))
    (folder / "added_tokens.json").write_text(json.dumps(ids))
    real, base = spec["token_ids"], spec["byte_level_bpe_ranks"]
    assert {t: i - n for t, i in ids.items()} == {t: i - base for t, i in real.items()}
    return ids


def write_release_code(folder: Path) -> Path:
    """The release's python files (tokenizer, config, model), each recording that it ran if anything executes it."""
    marker = folder / "REMOTE_CODE_RAN"
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py", "configuration_internvl_chat.py",
                 "configuration_intern_vit.py", "modeling_internvl_chat.py", "modeling_intern_vit.py",
                 "configuration_internlm2.py", "modeling_internlm2.py", "conversation.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    return marker


# ---- weights from the key patterns --------------------------------------------------------------------------------
def _shape(key: str, cfg: dict, vocab: int) -> tuple[int, ...]:
    """The shape of a key in the reference modules (InternViT, mlp1, InternLM2 / Qwen2, RESDecoder)."""
    vit, llm = cfg["vision_config"], cfg["llm_config"]
    d, i_v, p = vit["hidden_size"], vit["intermediate_size"], vit["patch_size"]
    grid = cfg["force_image_size"] // p
    t, f_t, heads, kv = llm["hidden_size"], llm["intermediate_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = t // heads
    table = [
        (r".*class_embedding", (1, 1, d)), (r".*position_embedding", (1, grid * grid + 1, d)),
        (r".*patch_embedding\.weight", (d, 3, p, p)), (r".*attn\.qkv\.weight", (3 * d, d)),
        (r".*attn\.qkv\.bias", (3 * d,)), (r".*attn\.proj\.weight", (d, d)), (r".*mlp\.fc1\.weight", (i_v, d)),
        (r".*mlp\.fc1\.bias", (i_v,)), (r".*mlp\.fc2\.weight", (d, i_v)),
        (r"vision_model\..*", (d,)),
        (r"mlp1\.0\..*", (4 * d,)), (r"mlp1\.1\.weight", (t, 4 * d)), (r"mlp1\.1\.bias", (t,)),
        (r"mlp1\.3\.weight", (t, t)), (r"mlp1\.3\.bias", (t,)),
        (r".*(tok_embeddings|embed_tokens|output|lm_head)\.weight", (vocab, t)),
        (r".*wqkv\.(base_layer\.)?weight", ((heads + 2 * kv) * hd, t)),
        (r".*q_proj\.(base_layer\.)?weight", (heads * hd, t)), (r".*q_proj\.(base_layer\.)?bias", (heads * hd,)),
        (r".*[kv]_proj\.(base_layer\.)?weight", (kv * hd, t)), (r".*[kv]_proj\.(base_layer\.)?bias", (kv * hd,)),
        (r".*(wo|o_proj)\.(base_layer\.)?weight", (t, t)),
        (r".*(w1|w3|gate_proj|up_proj)\.(base_layer\.)?weight", (f_t, t)),
        (r".*(w2|down_proj)\.(base_layer\.)?weight", (t, f_t)),
        (r"language_model\..*norm\.weight|language_model\..*layernorm\.weight", (t,)),
        (r"res_decoder\.(img_llm_down|text_down)\.weight", (d, t)), (r"res_decoder\.text_out_adapter\.weight", (d, 3 * d)),
        (r".*in_proj_weight", (3 * d, d)), (r".*in_proj_bias", (3 * d,)),
        (r".*(out_proj|linear1|linear2)\.weight", (d, d)),
        (r".*offset\.weight", (32, d, 1, 1)), (r".*offset\.bias", (32,)), (r".*init_pos", (1, 32, 1, 1)),
        (r".*conv1\.0\.weight", (p * p, d, 3, 3)), (r".*num_batches_tracked", ()),
        (r".*conv1\..*", (p * p,)), (r".*conv2\.weight", (1, 1, 5, 5)), (r".*conv2\.bias", (1,)),
        (r"res_decoder\..*", (d,)),
    ]
    for pattern, shape in table:
        if re.fullmatch(pattern, key):
            return shape
    raise AssertionError(f"no shape for {key}")


def dysample_init_pos(scale: int = 2, groups: int = 4) -> torch.Tensor:
    """DySample's fixed sub-pixel positions, as the reference buffer holds them."""
    h = torch.arange((-scale + 1) / 2, (scale - 1) / 2 + 1) / scale
    return torch.stack(torch.meshgrid([h, h], indexing="ij")).transpose(1, 2).repeat(1, groups, 1).reshape(1, -1, 1, 1)


def build_state(layout: dict, cfg: dict, vocab: int, seed: int) -> tuple[dict, dict]:
    """(source tensors in the layout's keys and dtypes, effective float32 weights in the merged original names)."""
    g = torch.Generator().manual_seed(seed)
    layers = {"vision_model": cfg["vision_config"]["num_hidden_layers"], "language_model": cfg["llm_config"]["num_hidden_layers"]}
    weights = layout["weights"]
    source, effective = {}, {}
    lora_scale = layout["lora"]["lora_alpha"] / layout["lora"]["r"] if layout.get("lora") else None
    r = 3
    for pattern in layout["key_patterns"]:
        count = layers[pattern.split(".")[0]] if "{N}" in pattern else 1
        for n in range(count):
            key = pattern.replace("{N}", str(n))
            if ".lora_A." in key or ".lora_B." in key:
                continue
            plain = key.replace("base_model.model.", "").replace(".base_layer.", ".")
            shape = _shape(plain, cfg, vocab)
            dtype = getattr(torch, weights.get("decoder_dtype", weights["dtype"]) if key.startswith("res_decoder.")
                            else weights["dtype"])
            if key.endswith("num_batches_tracked"):
                value = torch.tensor(7, dtype=torch.long)
            elif key.endswith("init_pos"):
                value = dysample_init_pos().to(dtype)
            elif key.endswith("running_var"):
                value = (0.5 + torch.rand(shape, generator=g)).to(dtype)
            else:
                scale = 1.0 if key.endswith("class_embedding") else 0.15
                value = (torch.randn(shape, generator=g) * scale + (1.0 if re.search(r"norm|ls\d|\.1\.weight$", plain)
                                                                    and len(shape) == 1 else 0.0)).to(dtype)
            source[key] = value
            effective[plain] = value.float()
            if ".base_layer.weight" in key:
                prefix = key[: -len(".base_layer.weight")]
                a = (torch.randn(r, shape[1], generator=g) * 0.2).to(dtype)
                b = (torch.randn(shape[0], r, generator=g) * 0.2).to(dtype)
                source[f"{prefix}.lora_A.default.weight"], source[f"{prefix}.lora_B.default.weight"] = a, b
                # W + (alpha / r) B A in float32, stored in the release's dtype (as a merge_and_unload of the
                # reference's bf16 model keeps it)
                effective[plain] = (value.float() + lora_scale * (b.float() @ a.float())).to(dtype).float()
    assert set(source) >= {p.replace("{N}", "0") for p in layout["key_patterns"]}
    return source, effective


def write_weights(folder: Path, state: dict, weights: dict, shards: int = 3) -> None:
    if weights["format"] == "bin" and not weights["sharded"]:
        torch.save(state, folder / weights["file"])
        return
    if not weights["sharded"]:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights["file"]), metadata={"format": "pt"})
        return
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = weights["shard_pattern"].format(i=i + 1, n=shards)
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / weights["index"]).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def write_source(folder: Path, layout: dict, seed: int = 0):
    """The release folder, from its description: config.json, weights, tokenizer files, the release's code."""
    folder.mkdir(parents=True, exist_ok=True)
    internlm2 = layout["llm_family"] == "internlm2"
    ids = (write_sentencepiece_tokenizer if internlm2 else write_qwen2_tokenizer)(folder, layout)
    vocab = max(ids.values()) + 1
    cfg = json.loads(json.dumps(layout["config"]))
    cfg["llm_config"]["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    marker = write_release_code(folder)
    state, effective = build_state(layout, cfg, vocab, seed)
    write_weights(folder, state, layout["weights"])
    present = {p.name for p in folder.iterdir()}
    assert set(layout["tokenizer"]["files"]) - {"tokenizer.json"} <= present | {"tokenizer.json"}
    return cfg, ids, state, effective, marker


# ---- independent reference forwards -------------------------------------------------------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def reference_llm_logits(w: dict, llm: dict, family: str, input_ids: torch.Tensor) -> torch.Tensor:
    """The reference LLM (InternLM2ForCausalLM / transformers 4.37 Qwen2ForCausalLM) on `input_ids` `[1, L]`:
    float32 logits `[1, L, V]` from original-layout weights. InternLM2's `wqkv` is read as
    `view(b, L, kv, groups + 2, hd)`; its rope is dynamic-NTK past `max_position_embeddings` (4.37's Qwen2 has no
    rope scaling)."""
    t, heads, kv = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    hd, groups, eps, length = t // heads, heads // kv, llm["rms_norm_eps"], input_ids.shape[1]
    lm = "language_model.model."
    base = float(llm["rope_theta"])
    scaling = llm.get("rope_scaling")
    if family == "internlm2" and scaling and length > llm["max_position_embeddings"]:
        factor = scaling["factor"]
        base = base * ((factor * length / llm["max_position_embeddings"]) - (factor - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    x = w[lm + ("tok_embeddings.weight" if family == "internlm2" else "embed_tokens.weight")][input_ids[0]]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for n in range(llm["num_hidden_layers"]):
        p = f"{lm}layers.{n}."
        h = _rms(x, w[p + ("attention_norm.weight" if family == "internlm2" else "input_layernorm.weight")], eps)
        if family == "internlm2":
            qkv = (h @ w[p + "attention.wqkv.weight"].T).view(length, kv, groups + 2, hd)
            q = qkv[:, :, :groups].reshape(length, heads, hd)
            k, v = qkv[:, :, -2], qkv[:, :, -1]
        else:
            q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(length, heads, hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(length, kv, hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(length, kv, hd)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        out = torch.empty(length, heads, hd)
        for head in range(heads):  # query head `head` reads kv head `head // groups`
            scores = q[:, head] @ k[:, head // groups].T / math.sqrt(hd) + causal
            out[:, head] = scores.softmax(-1) @ v[:, head // groups]
        out = out.reshape(length, t) @ w[p + ("attention.wo.weight" if family == "internlm2" else "self_attn.o_proj.weight")].T
        x = x + out
        h = _rms(x, w[p + ("ffn_norm.weight" if family == "internlm2" else "post_attention_layernorm.weight")], eps)
        if family == "internlm2":
            mlp = (F.silu(h @ w[p + "feed_forward.w1.weight"].T) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
        else:
            mlp = (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        x = x + mlp
    x = _rms(x, w[lm + "norm.weight"], eps)
    head = w["language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"]
    return (x @ head.T)[None]


def _transformer_decoder(w: dict, prefix: str, d: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torch's own post-norm decoder layer (the reference's TransformerDecoderLayer: 8 heads, ffn = d, relu) and final
    LayerNorm, loaded from `res_decoder.<block>.decoder.*`."""
    layer = torch.nn.TransformerDecoderLayer(d, 8, dim_feedforward=d, dropout=0.1, activation="relu").eval()
    layer.load_state_dict({k[len(prefix + "layers.0."):]: v for k, v in w.items() if k.startswith(prefix + "layers.0.")})
    norm = torch.nn.LayerNorm(d).eval()
    norm.load_state_dict({"weight": w[prefix + "norm.weight"], "bias": w[prefix + "norm.bias"]})
    return layer, norm


def _dysample(w: dict, x: torch.Tensor, scale: int = 2, groups: int = 4) -> torch.Tensor:
    """DySample 'lp' (static scope 0.25), written from the paper's sampling rule."""
    offset = F.conv2d(x, w["res_decoder.upsample_adapter_l.offset.weight"], w["res_decoder.upsample_adapter_l.offset.bias"])
    offset = offset * 0.25 + w["res_decoder.upsample_adapter_l.init_pos"]
    b, _, h, wd = offset.shape
    offset = offset.view(b, 2, -1, h, wd)
    coords = torch.stack(torch.meshgrid([torch.arange(wd) + 0.5, torch.arange(h) + 0.5], indexing="ij")).transpose(1, 2)
    coords = coords.unsqueeze(1).unsqueeze(0).to(x.dtype)
    normaliser = torch.tensor([wd, h], dtype=x.dtype).view(1, 2, 1, 1, 1)
    coords = 2 * (coords + offset) / normaliser - 1
    coords = F.pixel_shuffle(coords.reshape(b, -1, h, wd), scale).view(b, 2, -1, scale * h, scale * wd)
    coords = coords.permute(0, 2, 3, 4, 1).contiguous().flatten(0, 1)
    out = F.grid_sample(x.reshape(b * groups, -1, h, wd), coords, mode="bilinear", align_corners=False,
                        padding_mode="border")
    return out.view(b, -1, scale * h, scale * wd)


@torch.no_grad()
def reference_res_decoder(w: dict, img_vit: torch.Tensor, img_llm: torch.Tensor, text: torch.Tensor,
                          grid: int, patch: int) -> torch.Tensor:
    """MLLMSeg's RESDecoder.forward (seq-first, as the reference): `[M, G*G, D]`, `[M, g*g, T]`, `[M, T]` ->
    mask probabilities `[M, S, S]`."""
    m, d = img_vit.shape[0], img_vit.shape[-1]
    lin = lambda name, x: x @ w[f"res_decoder.{name}.weight"].T + w[f"res_decoder.{name}.bias"]  # noqa: E731
    text_src = lin("text_down", text[:, None])
    llm16 = lin("img_llm_down", img_llm)
    layer, norm = _transformer_decoder(w, "res_decoder.ca_layer_v2l.decoder.", d)
    v2l = norm(layer(img_vit.permute(1, 0, 2), llm16.permute(1, 0, 2))).permute(1, 0, 2)
    v2l = v2l.reshape(m, grid, grid, d).permute(0, 3, 1, 2)
    vit32 = img_vit.reshape(m, grid, grid, d).permute(0, 3, 1, 2)
    llm32 = _dysample(w, llm16.reshape(m, grid // 2, grid // 2, d).permute(0, 3, 1, 2))
    out = torch.cat([v2l.flatten(2), vit32.flatten(2), llm32.flatten(2)], dim=1)
    out = lin("text_out_adapter", out.permute(0, 2, 1))
    layer, norm = _transformer_decoder(w, "res_decoder.ca_layer_vl.decoder.", d)
    tgt = norm(layer(out.permute(1, 0, 2), text_src.permute(1, 0, 2)))
    tgt = tgt.permute(1, 2, 0).reshape(m, d, grid, grid)
    x = F.conv2d(tgt, w["res_decoder.conv1.0.weight"], w["res_decoder.conv1.0.bias"], padding=1)
    x = F.batch_norm(x, w["res_decoder.conv1.1.running_mean"], w["res_decoder.conv1.1.running_var"],
                     w["res_decoder.conv1.1.weight"], w["res_decoder.conv1.1.bias"], training=False, eps=1e-5).relu()
    x = x.permute(0, 2, 3, 1).reshape(-1, grid, grid, patch, patch).permute(0, 1, 3, 2, 4)
    x = x.reshape(-1, 1, grid * patch, grid * patch)
    return F.conv2d(x, w["res_decoder.conv2.weight"], w["res_decoder.conv2.bias"], padding=2).sigmoid()[:, 0]


# ---- checks shared by the layouts ---------------------------------------------------------------------------------
def prompt_ids(dst: Path, family: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    return torch.tensor([([tok.bos_token_id] if family == "internlm2" else []) + ids])


def check_llm(dst: Path, layout: dict, cfg: dict, effective: dict, old_rows: int) -> MLLMSegForConditionalGeneration:
    model = MLLMSegForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    ids = prompt_ids(dst, layout["llm_family"])
    if layout["llm_family"] == "internlm2":
        assert ids.shape[1] > cfg["llm_config"]["max_position_embeddings"]  # dynamic NTK rope in play
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., :old_rows]
    torch.testing.assert_close(ours, reference_llm_logits(effective, cfg["llm_config"], layout["llm_family"], ids),
                               atol=2e-5, rtol=1e-4)
    return model


def check_decoder(model, cfg: dict, effective: dict) -> None:
    g = torch.Generator().manual_seed(5)
    grid = cfg["force_image_size"] // cfg["vision_config"]["patch_size"]
    d, t = cfg["vision_config"]["hidden_size"], cfg["llm_config"]["hidden_size"]
    vit, llm, text = (torch.randn(2, grid * grid, d, generator=g), torch.randn(2, grid * grid // 4, t, generator=g),
                      torch.randn(2, t, generator=g))
    with torch.no_grad():
        ours = model.mask_decoder(vit, llm, text).sigmoid()
    reference = reference_res_decoder(effective, vit, llm, text, grid, cfg["vision_config"]["patch_size"])
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def check_saved(dst: Path, layout: dict, ids: dict) -> dict:
    """Token ids, source dtypes per tensor, chat stop token, BOS convention and a text_config free of 4.37 fields."""
    from safetensors import safe_open
    from transformers import AutoConfig

    saved = json.loads((dst / "config.json").read_text())
    assert saved["image_token_id"] == ids["<IMG_CONTEXT>"] and saved["image_start_token_id"] == ids["<img>"]
    if "[SEG]" in ids:
        assert (saved["seg_token_id"], saved["rej_token_id"]) == (ids["[SEG]"], ids["[REJ]"])
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    weights = layout["weights"]
    expect = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    assert {d for k, d in dtypes.items() if k.startswith("model.language_model.")} == {expect[weights["dtype"]]}
    if "decoder_dtype" in weights:
        assert {d for k, d in dtypes.items() if k.startswith("mask_decoder.") and d != "I64"} == {expect[weights["decoder_dtype"]]}
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == ids["<|im_end|>"]
    from transformers import AutoTokenizer

    from mllmseg.remote_code.processing_mllmseg import tokenizer_adds_bos

    # InternLM2: `<s>` before every text (as the reference prompts); Qwen2: no BOS
    assert tokenizer_adds_bos(AutoTokenizer.from_pretrained(dst)) is (layout["llm_family"] == "internlm2")
    text = saved["text_config"]
    for stale in ("_name_or_path", "transformers_version", "architectures", "attn_implementation", "use_flash_attn",
                  "use_bfloat16", "auto_map", "_attn_implementation_autoset", "top_k", "id2label", "torch_dtype",
                  "bad_words_ids", "bias", "moe_config"):
        assert stale not in text, stale
    assert text["bos_token_id"] == ids.get("<s>")  # Qwen2: none (its llm_config says 151643)
    AutoConfig.from_pretrained(dst, trust_remote_code=True)  # the saved config loads as written
    return saved


# ---- tests --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["internvl2_5_8b", "internvl2_5_2b", "internvl2_5_1b", "internvl2_5_4b"])
def test_original_layout_base_converts_to_the_reference_forward(tmp_path, name):
    """An OpenGVLab base in its published layout (convert_internvl): the LLM's logits equal the reference forward of
    the source weights over the old vocabulary; [SEG] / [REJ] follow the last token; nothing of the source ran."""
    layout = load_layout(name)
    cfg, ids, state, effective, marker = write_source(tmp_path / "src", layout, seed=1)
    dst = convert_internvl(tmp_path / "src", tmp_path / "dst")
    old_rows = max(ids.values()) + 1
    ids = dict(ids, **{"[SEG]": old_rows, "[REJ]": old_rows + 1})
    check_saved(dst, layout, ids)
    check_llm(dst, layout, cfg, effective, old_rows)
    assert not marker.exists()


def test_mllmseg_8b_res_release_converts_with_the_cli_unattended(tmp_path):
    """`mllmseg convert-upstream SRC DST` on the 8B RES release reproduction (sentencepiece tokenizer.model only,
    merged `pytorch_model.bin`, fp16 decoder in a bf16 release): no --tokenizer, stdin closed (a prompt would fail),
    no source file executed; logits and masks equal the reference forward."""
    layout = load_layout("MLLMSeg_InternVL2_5_8B_RES")
    src = tmp_path / "MLLMSeg_InternVL2_5_8B_RES"
    cfg, ids, state, effective, marker = write_source(src, layout, seed=2)
    assert not (src / "tokenizer.json").exists() and (src / "pytorch_model.bin").is_file()
    run = subprocess.run([sys.executable, "-m", "mllmseg", "convert-upstream", str(src), str(tmp_path / "dst")],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                              "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not marker.exists() and "custom code" not in run.stdout + run.stderr
    dst = tmp_path / "dst"
    check_saved(dst, layout, ids)
    model = check_llm(dst, layout, cfg, effective, max(ids.values()) + 1)
    check_decoder(model, cfg, effective)


@pytest.mark.parametrize("name", ["MLLMSeg_InternVL2_5_8B_GRES", "MLLMSeg_InternVL2_5_1B_RES",
                                  "MLLMSeg_InternVL2_5_2B_RES", "MLLMSeg_InternVL2_5_4B_RES"])
def test_mllmseg_release_layouts_convert_to_the_reference_forward(tmp_path, name):
    """GRES with unmerged PEFT LoRA (use_llm_lora: 64, alpha 2r) in sharded safetensors; 1B / 4B merged `.bin`
    (Qwen2, the 1B with only vocab.json + merges.txt); 2B unmerged: logits and masks equal the reference forward
    of the (LoRA-merged by the test) source weights."""
    layout = load_layout(name)
    cfg, ids, state, effective, marker = write_source(tmp_path / "src", layout, seed=3)
    assert any(".lora_A.default." in k for k in state) is (not layout["merged_lora"])
    dst = convert_upstream(tmp_path / "src", tmp_path / "dst")
    check_saved(dst, layout, ids)
    model = check_llm(dst, layout, cfg, effective, max(ids.values()) + 1)
    check_decoder(model, cfg, effective)
    assert not marker.exists()


def test_hf_base_via_from_internvl(tmp_path):
    """A transformers-native `-hf` base (legacy key names, text_config / vision_config): from_internvl keeps every
    weight, so the logits over the old vocabulary equal the reference forward of the source weights."""
    from mllmseg.base_checkpoint import from_internvl

    layout = load_layout("internvl2_5_1b_hf")
    src = tmp_path / "hf"
    ids = write_qwen2_tokenizer(src, layout)
    vocab = max(ids.values()) + 1
    cfg = json.loads(json.dumps(layout["config"]))
    cfg["text_config"]["vocab_size"], cfg["image_token_id"] = vocab, ids["<IMG_CONTEXT>"]
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    chat_like = {"vision_config": {**cfg["vision_config"], "image_size": 112, "patch_size": 14},
                 "llm_config": cfg["text_config"], "force_image_size": 112}
    g = torch.Generator().manual_seed(4)
    state, effective = {}, {}
    for pattern in layout["key_patterns"]:
        for n in range(2 if "{N}" in pattern else 1):
            key = pattern.replace("{N}", str(n))
            original = (key.replace("vision_tower.", "vision_model.").replace("multi_modal_projector.layer_norm", "mlp1.0")
                        .replace("multi_modal_projector.linear_1", "mlp1.1").replace("multi_modal_projector.linear_2", "mlp1.3"))
            shape = (_shape(original, chat_like, vocab) if original.startswith(("language_model", "mlp1"))
                     else tuple(torch.Size([64])))
            if key.endswith("cls_token"):
                shape = (1, 1, 64)
            elif key.endswith("position_embeddings"):
                shape = (1, 65, 64)
            elif "projection.weight" in key:
                shape = (64, 3, 14, 14)
            elif re.search(r"(q|k|v)_proj\.weight|projection_layer\.weight", key) and key.startswith("vision"):
                shape = (64, 64)
            elif "fc1.weight" in key:
                shape = (128, 64)
            elif "fc1.bias" in key:
                shape = (128,)
            elif "fc2.weight" in key:
                shape = (64, 128)
            value = (torch.randn(shape, generator=g) * 0.15).to(torch.bfloat16)
            state[key], effective[original] = value, value.float()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, tokenizer = from_internvl(src)
    model = model.float().eval()
    text = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids_t = torch.tensor([text])
    with torch.no_grad():
        ours = model(input_ids=ids_t).logits[..., :vocab]
    torch.testing.assert_close(ours, reference_llm_logits(effective, cfg["text_config"], "qwen2", ids_t), atol=2e-5,
                               rtol=1e-4)
    assert model.config.seg_token_id == vocab and model.config.rej_token_id == vocab + 1


def test_from_internvl_refuses_an_original_layout_folder(tmp_path):
    """An original-layout base (llm_config, auto_map to the release's code): a clear error pointing to
    convert-internvl, before transformers could ask to run the release's code."""
    from mllmseg.base_checkpoint import from_internvl

    layout = load_layout("internvl2_5_1b")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(layout["config"]))
    marker = write_release_code(src)
    with pytest.raises(ValueError, match=r"mllmseg convert-internvl .*src OUT") as info:
        from_internvl(src)
    assert "llm_config" in str(info.value) and "config.json" in str(info.value)
    assert not marker.exists()


def test_qwen2_text_config_keeps_only_fields_qwen2config_takes():
    """A 4.37-era Qwen2 llm_config dump (InternVL2.5-1B) -> text_config with Qwen2Config's own fields only; the
    token ids come from the tokenizer (no BOS), not from the dump."""
    import inspect

    from transformers import Qwen2Config

    from mllmseg.convert.upstream import _text_config

    llm = load_layout("internvl2_5_1b")["config"]["llm_config"]
    assert {"_name_or_path", "transformers_version", "_attn_implementation_autoset", "top_k", "use_bfloat16"} <= set(llm)
    text = _text_config(llm, 500, special_ids={"bos_token_id": None, "eos_token_id": 7, "pad_token_id": 3})
    accepted = set(inspect.signature(Qwen2Config.__init__).parameters) | {"rope_theta", "model_type"}
    assert set(text) <= accepted, set(text) - accepted
    assert text["bos_token_id"] is None and text["eos_token_id"] == 7 and text["vocab_size"] == 500
    assert text["max_window_layers"] == llm["max_window_layers"] and text["rope_theta"] == llm["rope_theta"]
    config = Qwen2Config(**{k: v for k, v in text.items() if k != "model_type"})
    assert config.rope_parameters["rope_theta"] == 1000000.0


STRINGS = ["Hello world", " leading space", "The red circle is 12345", "每个人都有权享受教育。", "emoji 😀🚀 🦜 test",
           "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhere is the red circle?<|im_end|>\n"
           "<|im_start|>assistant\nIt is [SEG].<|im_end|>", "tabs\tand\n\nnew lines  double  space", "café 红色的圆 ∑ ü",
           "<ref>cat</ref><box>[[1, 2, 3, 4]]</box>", "[REJ][SEG]x", "🙂", ""]


@pytest.mark.parametrize("add_dummy_prefix, normalization", [(False, "identity"), (True, "nmt_nfkc")])
def test_sentencepiece_tokenizer_is_converted_locally(tmp_path, add_dummy_prefix, normalization):
    """A tokenizer.model trained here (BPE, byte fallback, InternLM2's file set): the fast tokenizer built without
    remote code encodes like sentencepiece on the text between added tokens, with the BOS first; it decodes back."""
    from mllmseg.convert.upstream import fast_tokenizer_from_sentencepiece

    layout = load_layout("MLLMSeg_InternVL2_5_8B_RES")
    ids = write_sentencepiece_tokenizer(tmp_path, layout, add_dummy_prefix=add_dummy_prefix,
                                        normalization=normalization)
    marker = write_release_code(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    added = {t: i for t, i in ids.items() if t not in ("<unk>", "<s>", "</s>")}
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
    try:
        tok = fast_tokenizer_from_sentencepiece(tmp_path)
    except ValueError as error:
        # Refused: then transformers' own conversion really encodes differently from sentencepiece (transformers
        # 5.18 drops the dummy prefix), and nothing wrong was returned.
        from transformers import PreTrainedTokenizerFast

        assert "sentencepiece conversion does not reproduce this model" in str(error)
        raw = PreTrainedTokenizerFast.from_pretrained(tmp_path, vocab_file=str(tmp_path / "tokenizer.model"))
        assert any(raw(t, add_special_tokens=False)["input_ids"] != sp.encode(t) for t in STRINGS if t)
        assert add_dummy_prefix  # InternLM2's convention (no dummy prefix) converts on every supported release
        return
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    byte_pieces = 0
    for text in STRINGS:
        expected = [1] + [i for part in split.split(text) if part
                          for i in ([added[part]] if part in added else sp.encode(part))]
        got = tok(text)["input_ids"]
        assert got == expected, (text, got, expected)
        byte_pieces += sum(sp.is_byte(i) for i in expected if i < sp.get_piece_size())
        if not add_dummy_prefix:  # InternLM2's convention: the text comes back as sentencepiece decodes it
            decoded = "<s>" + "".join(part if part in added else sp.decode(sp.encode(part)) for part in split.split(text))
            assert tok.decode(got, skip_special_tokens=False) == decoded
        elif not split.search(text):  # with a dummy prefix, on plain text (no added token to re-prefix after)
            assert tok.decode(got, skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert byte_pieces > 0  # some characters went through byte fallback
    assert not marker.exists()


def test_without_sentencepiece_the_error_names_the_file_and_the_fix(tmp_path):
    """sentencepiece absent (blocked in a fresh process): convert-upstream on a tokenizer.model-only release exits
    with an error naming the file, `pip install mllmseg[sentencepiece]` and --tokenizer."""
    layout = load_layout("MLLMSeg_InternVL2_5_8B_RES")
    src = tmp_path / "src"
    write_source(src, layout, seed=6)
    code = ("import sys; sys.modules['sentencepiece'] = None; from mllmseg.cli import main; "
            f"sys.exit(main(['convert-upstream', {str(src)!r}, {str(tmp_path / 'dst')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                                           "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 2, run.stderr[-2000:]
    message = run.stdout + run.stderr
    assert str(src / "tokenizer.model") in message and "pip install mllmseg[sentencepiece]" in message
    assert "--tokenizer" in message and not (tmp_path / "dst" / "model.safetensors").exists()
