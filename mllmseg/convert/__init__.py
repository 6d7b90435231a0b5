"""Converters from original-layout (reference repository) InternVL / MLLMSeg checkpoints; see `upstream`."""
from .upstream import (
    build_config,
    convert_internvl,
    convert_state_dict,
    convert_upstream,
    fast_tokenizer_from_sentencepiece,
    load_source_config,
    load_source_state_dict,
    merge_lora_weights,
    split_internlm2_wqkv,
    split_vit_qkv,
)

__all__ = [
    "convert_upstream", "convert_internvl", "convert_state_dict", "merge_lora_weights", "split_internlm2_wqkv",
    "split_vit_qkv", "load_source_state_dict", "load_source_config", "build_config", "fast_tokenizer_from_sentencepiece",
]
