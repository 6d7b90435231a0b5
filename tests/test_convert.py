"""Original-layout (reference repository) checkpoints -> ours.

The sources are built here from KNOWN weights: a tiny model of ours is written out in the upstream naming (InternLM2
fused GQA `wqkv`, Qwen2 names, InternViT fused `attn.qkv`, `mlp1.*`, `res_decoder.*`) with an InternVLChatConfig-style
config.json, converted back, and must give the same logits and mask logits. The fusions below are written
independently of the converter (explicit per-head loops).
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from mllmseg import MLLMSegForConditionalGeneration
from mllmseg.cli import main as cli_main
from mllmseg.convert import convert_upstream, merge_lora_weights, split_internlm2_wqkv
from mllmseg.tiny import build_tiny_tokenizer, tiny_config
from tests._models import batch_inputs


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_model(tokenizer, text_model_type, seed=0):
    config = tiny_config(tokenizer, text_model_type=text_model_type)
    config.vision_config.attention_bias = True  # exercise the qkv bias split
    if text_model_type == "llama":
        config.text_config.attention_bias = True  # InternLM2 `bias: true`: wqkv and wo biases
    torch.manual_seed(seed)
    model = MLLMSegForConditionalGeneration(config).eval()
    with torch.no_grad():  # no parameter keeps its default (ones / zeros), so a swapped name cannot go unnoticed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(1 + torch.rand_like(b))
    return model


# ---- independent writers of the upstream layout ------------------------------------------------------------------
def fuse_wqkv(q, k, v, heads, kv_heads, head_dim):
    """InternLM2 rows: for each kv head h: its q heads h*G .. h*G+G-1, then k head h, then v head h."""
    groups = heads // kv_heads
    rows = []
    for h in range(kv_heads):
        for g in range(groups):
            qh = h * groups + g
            rows.append(q[qh * head_dim : (qh + 1) * head_dim])
        rows.append(k[h * head_dim : (h + 1) * head_dim])
        rows.append(v[h * head_dim : (h + 1) * head_dim])
    return torch.cat(rows)


def to_upstream(model, internlm2: bool):
    cfg = model.config.text_config
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for key in list(sd):
        if key not in sd:
            continue
        value = sd[key]
        if key.startswith("model.vision_tower."):
            name = "vision_model." + key[len("model.vision_tower."):]
            if ".attention.q_proj." in name:
                suffix = name.rsplit(".", 1)[1]
                base = key.rsplit(".q_proj.", 1)[0]
                fused = torch.cat([sd.pop(f"{base}.{p}_proj.{suffix}") for p in "qkv"])
                out[name.replace(".attention.q_proj.", ".attn.qkv.").replace(".encoder.layer.", ".encoder.layers.")] = fused
                continue
            if ".attention.k_proj." in name or ".attention.v_proj." in name:
                continue
            for ours, theirs in ((".encoder.layer.", ".encoder.layers."), (".attention.projection_layer.", ".attn.proj."),
                                 (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
                                 (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
                                 ("embeddings.cls_token", "embeddings.class_embedding"),
                                 ("embeddings.position_embeddings", "embeddings.position_embedding"),
                                 ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding.")):
                name = name.replace(ours, theirs)
            out[name] = value
        elif key.startswith("model.multi_modal_projector."):
            part = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}[key.split(".")[2]]
            out[f"mlp1.{part}.{key.split('.')[-1]}"] = value
        elif key.startswith("mask_decoder."):
            name = "res_decoder." + key[len("mask_decoder."):]
            for blk in ("ca_layer_v2l", "ca_layer_vl"):
                name = name.replace(f"{blk}.layers.", f"{blk}.decoder.layers.").replace(f"{blk}.norm.", f"{blk}.decoder.norm.")
            out[name] = value
        elif key == "lm_head.weight":
            out["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = value
        elif key.startswith("model.language_model."):
            rest = key[len("model.language_model."):]
            if not internlm2:
                out["language_model.model." + rest] = value
                continue
            if ".self_attn.q_proj." in rest:
                suffix = rest.rsplit(".", 1)[1]
                base = key.rsplit(".q_proj.", 1)[0]
                q, k, v = (sd.pop(f"{base}.{p}_proj.{suffix}") for p in "qkv")
                out["language_model.model." + rest.replace("self_attn.q_proj", "attention.wqkv")] = fuse_wqkv(q, k, v, heads, kv, hd)
                continue
            if ".self_attn.k_proj." in rest or ".self_attn.v_proj." in rest:
                continue
            for ours, theirs in (("embed_tokens", "tok_embeddings"), ("self_attn.o_proj", "attention.wo"),
                                 ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                                 ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
                                 ("post_attention_layernorm", "ffn_norm")):
                rest = rest.replace(ours, theirs)
            out["language_model.model." + rest] = value
        else:
            raise AssertionError(f"unexpected key {key}")
    return out


def chat_config(model, internlm2: bool, **extra):
    cfg, v, t = model.config, model.config.vision_config, model.config.text_config
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.hidden_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  intermediate_size=v.intermediate_size, qkv_bias=v.attention_bias, qk_normalization=False,
                  norm_type="layer_norm", layer_norm_eps=v.layer_norm_eps, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, hidden_act="gelu", initializer_factor=0.1, dropout=0.0,
                  drop_path_rate=0.0, use_flash_attn=False)
    common = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                  num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                  rope_theta=t.rope_parameters["rope_theta"], vocab_size=t.vocab_size,
                  max_position_embeddings=t.max_position_embeddings, hidden_act="silu", tie_word_embeddings=False)
    if internlm2:
        llm = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=t.attention_bias,
                   rope_scaling=None, attn_implementation="eager", **common)
    else:
        llm = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                   sliding_window=4096, max_window_layers=t.num_hidden_layers, torch_dtype="float32", **common)
    config = dict(architectures=["MLLMSeg"], model_type="internvl_chat", vision_config=vision, llm_config=llm,
                  select_layer=-1, force_image_size=cfg.image_size, downsample_ratio=cfg.downsample_ratio,
                  template="internvl2_5", ps_version="v2", dynamic_image_size=True, use_thumbnail=True,
                  use_llm_lora=0, use_backbone_lora=0, min_dynamic_patch=1, max_dynamic_patch=12)
    config.update(extra)
    return config


def write_source(folder, state, config, tokenizer, fmt="safetensors", shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    keys = sorted(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def dump(part, path):
        if fmt == "safetensors":
            save_file({k: state[k].contiguous() for k in part}, str(path))
        else:
            torch.save({k: state[k] for k in part}, path)

    if shards == 1:
        dump(keys, folder / f"{stem}.{ext}")
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = keys[i::shards]
        dump(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def assert_same_outputs(original, converted, tokenizer, atol=1e-5):
    inputs = batch_inputs(original, tokenizer, [(1, "Sure, it is [SEG]."), (1, "Sure, they are [SEG], [SEG].")])
    with torch.no_grad():
        a, b = original(**inputs), converted(**inputs)
    torch.testing.assert_close(b.logits, a.logits, atol=atol, rtol=1e-4)
    assert len(a.pred_masks) == len(b.pred_masks) == 2
    for x, y in zip(a.pred_masks, b.pred_masks):
        assert x.shape[0] >= 1
        torch.testing.assert_close(y, x, atol=atol, rtol=1e-4)


# ---- tests --------------------------------------------------------------------------------------------------------
def test_wqkv_split_matches_slow_reference_gqa():
    """4 q heads, 2 kv heads: the split equals an element-by-element reading of the reference's rearrange
    ('b q (h gs d) -> b q h gs d', gs = groups + 2; q = [..., :groups] -> (h gs); k = [..., -2]; v = [..., -1])."""
    heads, kv, d, hidden = 4, 2, 3, 5
    gs = heads // kv + 2
    g = torch.Generator().manual_seed(0)
    weight = torch.randn((heads + 2 * kv) * d, hidden, generator=g)
    bias = torch.randn((heads + 2 * kv) * d, generator=g)
    x = torch.randn(7, hidden, generator=g)
    fused = x @ weight.T + bias  # [tokens, (h gs d)]
    q_ref = torch.empty(7, heads, d)
    k_ref = torch.empty(7, kv, d)
    v_ref = torch.empty(7, kv, d)
    for t in range(7):
        for h in range(kv):
            for s in range(gs):
                for e in range(d):
                    val = fused[t, (h * gs + s) * d + e]
                    if s < gs - 2:
                        q_ref[t, h * (gs - 2) + s, e] = val
                    elif s == gs - 2:
                        k_ref[t, h, e] = val
                    else:
                        v_ref[t, h, e] = val
    (qw, kw, vw), (qb, kb, vb) = split_internlm2_wqkv(weight, heads, kv, d), split_internlm2_wqkv(bias, heads, kv, d)
    torch.testing.assert_close((x @ qw.T + qb).view(7, heads, d), q_ref)
    torch.testing.assert_close((x @ kw.T + kb).view(7, kv, d), k_ref)
    torch.testing.assert_close((x @ vw.T + vb).view(7, kv, d), v_ref)
    with pytest.raises(ValueError, match="rows"):
        split_internlm2_wqkv(weight[:-1], heads, kv, d)


def test_merge_lora_math():
    g = torch.Generator().manual_seed(1)
    w, a, b, bias = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), torch.randn(6, generator=g)
    p = "language_model.base_model.model.model.layers.0.attention.wo"
    state = {f"{p}.base_layer.weight": w, f"{p}.base_layer.bias": bias, f"{p}.lora_A.default.weight": a,
             f"{p}.lora_B.default.weight": b, "language_model.base_model.model.output.weight": w}
    merged = merge_lora_weights(state, 0.5)
    assert set(merged) == {"language_model.model.layers.0.attention.wo.weight",
                           "language_model.model.layers.0.attention.wo.bias", "language_model.output.weight"}
    expected = w + 0.5 * torch.einsum("or,ri->oi", b, a)
    torch.testing.assert_close(merged["language_model.model.layers.0.attention.wo.weight"], expected)
    with pytest.raises(ValueError, match="no scale is known"):
        merge_lora_weights(state, {"language_model.": None})


def test_convert_upstream_internlm2(tmp_path, tokenizer):
    model = make_model(tokenizer, "llama")
    src = write_source(tmp_path / "src", to_upstream(model, internlm2=True), chat_config(model, True), tokenizer)
    assert any(".attention.wqkv." in k for k in json.dumps(list(to_upstream(model, True))).split('"'))
    dst = convert_upstream(src, tmp_path / "dst")
    assert (dst / "modeling_mllmseg.py").is_file() and (dst / "tokenizer_config.json").is_file()
    config = json.loads((dst / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["num_key_value_heads"] == 2
    assert config["text_config"]["attention_bias"] is True and config["tie_word_embeddings"] is False
    assert config["seg_token_id"] == tokenizer.convert_tokens_to_ids("[SEG]")
    converted = MLLMSegForConditionalGeneration.from_pretrained(dst).eval()
    assert_same_outputs(model, converted, tokenizer)


def test_convert_upstream_qwen2_sharded_safetensors_via_remote_code(tmp_path, tokenizer):
    from transformers import AutoModel

    model = make_model(tokenizer, "qwen2", seed=1)
    src = write_source(tmp_path / "src", to_upstream(model, internlm2=False), chat_config(model, False), tokenizer,
                       shards=3)
    assert (src / "model.safetensors.index.json").is_file()
    assert cli_main(["convert-upstream", str(src), str(tmp_path / "dst")]) == 0
    converted = AutoModel.from_pretrained(tmp_path / "dst", trust_remote_code=True).eval()
    assert converted.config.text_config.model_type == "qwen2"
    assert_same_outputs(model, converted, tokenizer)


@pytest.mark.parametrize("scale_from", ["config", "adapter_config"])
def test_convert_upstream_unmerged_lora_bin(tmp_path, tokenizer, scale_from):
    """LoRA-wrapped LLM and ViT (PEFT names, reference targets), `.bin` shards: base W0 = W - s B A, so a correct
    merge W0 + s B A gives back the original model."""
    model = make_model(tokenizer, "llama", seed=2)
    state = to_upstream(model, internlm2=True)
    r, scale = 3, 2.0 if scale_from == "config" else 12 / 3
    g = torch.Generator().manual_seed(3)
    wrapped = {}
    targets = (".attention.wqkv.", ".attention.wo.", ".feed_forward.w1.", ".feed_forward.w2.", ".feed_forward.w3.",
               ".attn.qkv.", ".attn.proj.", ".mlp.fc1.", ".mlp.fc2.")
    n_lora = 0
    for key, value in state.items():
        for comp in ("language_model.", "vision_model."):
            if key.startswith(comp):
                key = comp + "base_model.model." + key[len(comp):]
        if any(t in key for t in targets) and key.endswith((".weight", ".bias")):
            prefix, kind = key.rsplit(".", 1)
            if kind == "weight":
                a = torch.randn(r, value.shape[1], generator=g) * 0.1
                b = torch.randn(value.shape[0], r, generator=g) * 0.1
                wrapped[f"{prefix}.base_layer.weight"] = value - scale * (b @ a)
                wrapped[f"{prefix}.lora_A.default.weight"], wrapped[f"{prefix}.lora_B.default.weight"] = a, b
                n_lora += 1
            else:
                wrapped[f"{prefix}.base_layer.bias"] = value
            continue
        wrapped[key] = value
    assert n_lora == 2 * (5 + 4)
    extra = {"use_llm_lora": r, "use_backbone_lora": r} if scale_from == "config" else {}
    src = write_source(tmp_path / "src", wrapped, chat_config(model, True, **extra), tokenizer, fmt="bin", shards=2)
    if scale_from == "adapter_config":
        (src / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 12, "peft_type": "LORA"}))
    dst = convert_upstream(src, tmp_path / "dst")
    assert_same_outputs(model, MLLMSegForConditionalGeneration.from_pretrained(dst).eval(), tokenizer, atol=1e-4)


def test_unknown_and_missing_keys_fail_loudly(tmp_path, tokenizer):
    model = make_model(tokenizer, "qwen2")
    state = to_upstream(model, internlm2=False)
    config = chat_config(model, False)
    bad = dict(state, **{"res_decoder.bogus.weight": torch.zeros(1), "vision_model.encoder.layers.0.attn.extra": torch.zeros(1)})
    src = write_source(tmp_path / "unknown", bad, config, tokenizer)
    with pytest.raises(ValueError, match=r"res_decoder\.bogus\.weight") as info:
        convert_upstream(src, tmp_path / "out1")
    assert "vision_model.encoder.layers.0.attn.extra" in str(info.value)
    partial = {k: v for k, v in state.items() if k != "mlp1.3.weight"}
    src = write_source(tmp_path / "missing", partial, config, tokenizer)
    with pytest.raises(ValueError, match=r"model\.multi_modal_projector\.linear_2\.weight"):
        convert_upstream(src, tmp_path / "out2")
    assert cli_main(["convert-upstream", str(tmp_path / "missing"), str(tmp_path / "out3")]) == 2
    with pytest.raises(ValueError, match="convert_internvl"):  # a base checkpoint given to convert_upstream
        src = write_source(tmp_path / "base", {k: v for k, v in state.items() if not k.startswith("res_decoder.")},
                           config, tokenizer)
        convert_upstream(src, tmp_path / "out4")


def test_convert_internvl_base(tmp_path, tokenizer):
    """A base (no res_decoder, tokenizer without [SEG]/[REJ]): weights kept, tokens added, new rows at the mean,
    decoder initialised; logits over the old vocabulary equal the base model's."""
    base_tok = build_tiny_tokenizer(with_seg_tokens=False)
    n = len(base_tok)
    assert n == len(tokenizer) - 2 and base_tok.get_vocab()["<IMG_CONTEXT>"] == tokenizer.get_vocab()["<IMG_CONTEXT>"]
    model = make_model(tokenizer, "llama", seed=4)
    state = {k: v for k, v in to_upstream(model, internlm2=True).items() if not k.startswith("res_decoder.")}
    state["language_model.model.tok_embeddings.weight"] = state["language_model.model.tok_embeddings.weight"][:n].clone()
    state["language_model.output.weight"] = state["language_model.output.weight"][:n].clone()
    config = chat_config(model, True)
    config["llm_config"]["vocab_size"] = n
    src = write_source(tmp_path / "src", state, config, base_tok)
    assert cli_main(["convert-internvl", str(src), str(tmp_path / "dst")]) == 0
    converted = MLLMSegForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()
    assert converted.config.seg_token_id == tokenizer.convert_tokens_to_ids("[SEG]")
    emb = converted.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer)
    torch.testing.assert_close(emb[:n], model.get_input_embeddings().weight[:n])
    torch.testing.assert_close(emb[n:], emb[:n].mean(0, keepdim=True).expand(2, -1))
    torch.testing.assert_close(converted.lm_head.weight[n:], converted.lm_head.weight[:n].mean(0, keepdim=True).expand(2, -1))
    for key, value in model.state_dict().items():
        if not key.startswith(("mask_decoder.", "lm_head.", "model.language_model.embed_tokens.")):
            torch.testing.assert_close(converted.state_dict()[key], value, msg=key)
    decoder = converted.mask_decoder  # the reference initialisation: xavier-uniform matrices, zero biases, BN at 1/0
    assert not torch.equal(decoder.text_down.weight, model.mask_decoder.text_down.weight)
    bound = (6 / sum(decoder.text_down.weight.shape)) ** 0.5
    assert decoder.text_down.weight.abs().max() <= bound and decoder.text_down.weight.std() > bound / 4
    assert torch.all(decoder.text_down.bias == 0) and torch.all(decoder.conv1[1].weight == 1)
    torch.testing.assert_close(decoder.upsample_adapter_l.init_pos, decoder.upsample_adapter_l.initial_positions())
    inputs = batch_inputs(model, tokenizer, [(1, "Sure, it is [SEG].")])
    with torch.no_grad():
        a, b = model(**inputs), converted(**inputs)
    seg = inputs["input_ids"][0].tolist().index(converted.config.seg_token_id)
    torch.testing.assert_close(b.logits[:, :seg, :n], a.logits[:, :seg, :n], atol=1e-5, rtol=1e-4)
    assert b.pred_masks[0].shape == a.pred_masks[0].shape
    from transformers import AutoTokenizer

    assert "[REJ]" in AutoTokenizer.from_pretrained(tmp_path / "dst").get_vocab()


def test_text_config_mapping():
    """InternLM2 llm_config -> llama fields; a legacy (transformers 4.x to_dict) Qwen2 llm_config passes through."""
    from mllmseg.convert.upstream import _text_config

    internlm2 = dict(architectures=["InternLM2ForCausalLM"], hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                     rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
                     max_position_embeddings=32768, vocab_size=92553, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    t = _text_config(internlm2, 92553)
    assert t["model_type"] == "llama" and t["num_key_value_heads"] == 8 and t["head_dim"] == 128
    assert t["rms_norm_eps"] == 1e-5 and t["rope_theta"] == 1000000 and t["attention_bias"] is False
    assert t["rope_scaling"]["rope_type"] == "dynamic" and t["rope_scaling"]["factor"] == 2.0
    assert t["tie_word_embeddings"] is False and t["mlp_bias"] is False
    from transformers import LlamaConfig

    llama = LlamaConfig(**{k: v for k, v in t.items() if k != "model_type"})
    assert llama.rope_parameters["rope_type"] == "dynamic" and llama.rope_parameters["rope_theta"] == 1000000
    qwen = dict(architectures=["Qwen2ForCausalLM"], _name_or_path="x", hidden_size=896, num_attention_heads=14,
                num_key_value_heads=2, num_hidden_layers=24, intermediate_size=4864, rope_theta=1000000.0,
                use_sliding_window=False, sliding_window=32768, max_window_layers=21, torch_dtype="bfloat16",
                top_k=50, use_bfloat16=True, vocab_size=151674, tie_word_embeddings=True)
    t = _text_config(qwen, 151674)
    assert t["model_type"] == "qwen2" and t["tie_word_embeddings"] is False and "architectures" not in t


def _as_release_tokenizer_folder(folder, internlm2=True):
    """Make a source's tokenizer files look like an OpenGVLab / MLLMSeg release: `tokenizer_config.json` names the
    release's own classes in `auto_map`, whose files would record that they ran if anything executed them."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    name = "InternLM2Tokenizer" if internlm2 else "Qwen2Tokenizer"
    config["tokenizer_class"] = name
    config["auto_map"] = {"AutoTokenizer": [f"tokenization_internlm2.{name}", f"tokenization_internlm2_fast.{name}Fast"]}
    config_path.write_text(json.dumps(config))
    marker = folder / "REMOTE_CODE_RAN"
    for module in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return marker


def test_conversion_never_runs_or_asks_for_remote_code(tmp_path, tokenizer):
    """`mllmseg convert-upstream SRC DST` on a release whose tokenizer has `auto_map`: no prompt (stdin is closed, so
    a prompt would fail), nothing of the source executed, the same tokens."""
    import subprocess
    import sys

    model = make_model(tokenizer, "llama")
    src = write_source(tmp_path / "src", to_upstream(model, internlm2=True), chat_config(model, True), tokenizer)
    marker = _as_release_tokenizer_folder(src)
    run = subprocess.run([sys.executable, "-m", "mllmseg", "convert-upstream", str(src), str(tmp_path / "dst")],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert not marker.exists() and "custom code" not in run.stdout + run.stderr
    converted = MLLMSegForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()
    assert_same_outputs(model, converted, tokenizer)


def test_conversion_keeps_per_tensor_dtypes_and_source_settings(tmp_path, tokenizer):
    """A bf16 release with an fp16 decoder keeps the decoder's fp16 values exactly; `max_dynamic_patch` becomes the
    tile budget; plain `generate()` stops at `<|im_end|>`; a template other than internvl2_5 is refused."""
    from safetensors import safe_open

    model = make_model(tokenizer, "qwen2", seed=2)
    state = to_upstream(model, internlm2=False)
    state = {k: v.to(torch.float16 if k.startswith("res_decoder.") else torch.bfloat16) for k, v in state.items()}
    config = chat_config(model, False, max_dynamic_patch=6)
    src = write_source(tmp_path / "src", state, config, tokenizer)
    dst = convert_upstream(src, tmp_path / "dst")
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
        decoder_key = "mask_decoder.conv2.weight"
        assert torch.equal(f.get_tensor(decoder_key), state["res_decoder.conv2.weight"])
    assert {d for k, d in dtypes.items() if k.startswith("mask_decoder.") and d.is_floating_point} == {torch.float16}
    assert {d for k, d in dtypes.items() if k.startswith("model.language_model.")} == {torch.bfloat16}
    saved = json.loads((dst / "config.json").read_text())
    assert saved["max_dynamic_tiles"] == 6
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")

    bad = dict(config, template="internlm2-chat")
    src_bad = write_source(tmp_path / "bad", state, bad, tokenizer)
    with pytest.raises(ValueError, match="template 'internlm2-chat'"):
        convert_upstream(src_bad, tmp_path / "dst_bad")
