import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllmseg import DSFFMaskDecoder, count_mask_decoder_parameters
from mllmseg.remote_code.mask_decoder_mllmseg import DSFFAttentionBlock, DySampleUpsampler


@pytest.mark.parametrize(
    "text_width, expected",
    [(4096, 34_385_542), (2048, 30_191_238), (896, 27_831_942)],  # InternVL2.5-8B, 2B/4B, 1B
)
def test_parameter_counts_match_the_reference(text_width, expected):
    # InternViT-300M width 1024, 448 px tiles, patch 14; built on the meta device.
    assert count_mask_decoder_parameters(1024, text_width, vision_grid=32, patch_size=14) == expected


def test_parameter_names_follow_the_reference_modules():
    with torch.device("meta"):
        decoder = DSFFMaskDecoder(1024, 4096, 32, 14)
    names = dict(decoder.named_parameters())
    for key in [
        "img_llm_down.weight",
        "text_down.weight",
        "ca_layer_v2l.layers.0.self_attn.in_proj_weight",
        "ca_layer_v2l.layers.0.multihead_attn.out_proj.weight",
        "ca_layer_v2l.norm.weight",
        "upsample_adapter_l.offset.weight",
        "text_out_adapter.weight",
        "ca_layer_vl.layers.0.linear1.weight",
        "conv1.0.weight",
        "conv1.1.weight",
        "conv2.weight",
    ]:
        assert key in names, key
    assert tuple(names["upsample_adapter_l.offset.weight"].shape) == (32, 1024, 1, 1)  # 2 * 4 groups * 2 * 2
    assert tuple(names["conv1.0.weight"].shape) == (196, 1024, 3, 3)
    assert tuple(decoder.upsample_adapter_l.init_pos.shape) == (1, 32, 1, 1)


@pytest.mark.parametrize("memory_len", [7, 1])
def test_attention_block_equals_torch_transformer_decoder(memory_len):
    torch.manual_seed(0)
    dim, heads = 64, 8
    ours = DSFFAttentionBlock(dim, heads, dim, dropout=0.1).eval()
    reference = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(dim, heads, dim, 0.1, "relu"), 1, norm=nn.LayerNorm(dim)
    ).eval()
    for p in ours.parameters():  # non-trivial norms and biases too
        nn.init.normal_(p, std=0.2)
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    query, memory = torch.randn(3, 20, dim), torch.randn(3, memory_len, dim)
    with torch.no_grad():
        expected = reference(query.transpose(0, 1), memory.transpose(0, 1)).transpose(0, 1)  # seq-first reference
        got = ours(query, memory)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dysample_positions_and_bilinear_at_zero_offset():
    up = DySampleUpsampler(8, scale=2, groups=4)
    # Children of pixel (i, j) sit at +-0.25 pixel: x offsets then y offsets, per group.
    pos = up.init_pos.view(2, 4, 2, 2)
    torch.testing.assert_close(pos[0, 0], torch.tensor([[-0.25, 0.25], [-0.25, 0.25]]))
    torch.testing.assert_close(pos[1, 0], torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    nn.init.zeros_(up.offset.weight)
    nn.init.zeros_(up.offset.bias)
    # With zero learned offsets every child samples its parent's centre +-0.25 px: exactly bilinear x2
    # upsampling (align_corners=False, border clamp), which checks the coordinate bookkeeping end to end.
    x = torch.randn(2, 8, 6, 5)
    y = up(x)
    assert y.shape == (2, 8, 12, 10)
    torch.testing.assert_close(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def test_decoder_output_shape_and_image_fusion_reuse():
    torch.manual_seed(0)
    decoder = DSFFMaskDecoder(vision_dim=32, text_dim=48, vision_grid=8, patch_size=14).eval()
    vit, llm, seg = torch.randn(2, 64, 32), torch.randn(2, 16, 48), torch.randn(2, 48)
    with torch.no_grad():
        logits = decoder(vit, llm, seg)
        assert logits.shape == (2, 112, 112)
        # Fusing once and decoding two [SEG] of the same tile equals decoding each on its own.
        fused = decoder.fuse_image(vit[:1], llm[:1])
        both = decoder.decode(fused.expand(2, -1, -1), seg)
        torch.testing.assert_close(both[1], decoder(vit[:1], llm[:1], seg[1:])[0])


class _PerMaskTorchBlock(nn.Module):
    """The reference's order for `ca_layer_vl`: nothing per tile, torch's whole decoder layer once per [SEG]."""

    def __init__(self, block: DSFFAttentionBlock, dim: int, heads: int):
        super().__init__()
        self.block = nn.TransformerDecoder(nn.TransformerDecoderLayer(dim, heads, dim, 0.0, "relu"), 1,
                                           norm=nn.LayerNorm(dim))
        self.block.load_state_dict(block.state_dict(), strict=True)

    def self_attend(self, query):
        return query

    def attend_memory(self, query, memory):
        return self.block(query.transpose(0, 1), memory.transpose(0, 1)).transpose(0, 1)


def test_self_attention_once_per_tile_equals_the_reference_per_mask():
    # fuse_image runs ca_layer_vl's self-attention once per tile; the reference runs the whole block per [SEG].
    torch.manual_seed(0)
    decoder = DSFFMaskDecoder(vision_dim=32, text_dim=48, vision_grid=8, patch_size=14, num_heads=4).eval()
    for p in decoder.ca_layer_vl.parameters():
        nn.init.normal_(p, std=0.2)
    reference = copy.deepcopy(decoder)
    reference.ca_layer_vl = _PerMaskTorchBlock(decoder.ca_layer_vl, 32, 4).eval()
    vit, llm, seg = torch.randn(1, 64, 32), torch.randn(1, 16, 48), torch.randn(3, 48)
    with torch.no_grad():
        ours = decoder.decode(decoder.fuse_image(vit, llm).expand(3, -1, -1), seg)
        expected = reference.decode(reference.fuse_image(vit, llm).expand(3, -1, -1), seg)
    assert not torch.equal(ours[0], ours[1])  # the three [SEG] give three different masks
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_reference_initialisation_is_xavier_uniform():
    from mllmseg.tiny import build_tiny_model

    model, _ = build_tiny_model()
    weight = model.mask_decoder.text_out_adapter.weight  # fan_in 3*64, fan_out 64
    bound = math.sqrt(6 / (3 * 64 + 64))
    weight = weight.detach()
    assert float(weight.abs().max()) <= bound + 1e-6
    assert abs(float(weight.std()) - bound / math.sqrt(3)) < 0.1 * bound  # uniform, not normal(0, 0.02)


def test_one_key_cross_attention_is_its_value_projection_run_once():
    """With one memory token (the [SEG] embedding) the softmax is identically 1: the block's cross-attention equals
    torch's nn.MultiheadAttention with the same weights (float64, to 1e-6), while `out_proj` runs on one row per
    sample instead of one per query; the parameters keep the reference layout (torch's decoder loads them strictly)."""
    torch.manual_seed(0)
    dim, heads, lq = 32, 4, 64
    block = DSFFAttentionBlock(dim, heads, dim, dropout=0.1).double().eval()
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    layer = block.layers[0]
    reference = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True).double().eval()
    reference.load_state_dict(layer.multihead_attn.state_dict(), strict=True)
    query, memory = torch.randn(3, lq, dim, dtype=torch.float64), torch.randn(3, 1, dim, dtype=torch.float64)
    rows = []
    hook = layer.multihead_attn.out_proj.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    try:
        with torch.no_grad():
            got = layer._attention(layer.multihead_attn, query, memory)
            expected, weights = reference(query, memory, memory)
    finally:
        hook.remove()
    assert torch.equal(weights, torch.ones_like(weights))  # the single key takes all the weight
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert rows == [torch.Size([3, 1])]  # out_proj on one row per sample, not on the lq queries
    torch_decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(dim, heads, dim, 0.1, "relu"), 1,
                                          norm=nn.LayerNorm(dim))
    assert list(block.state_dict()) == list(torch_decoder.state_dict())
