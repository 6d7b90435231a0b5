"""Merge a LoRA adapter (from `mllmseg train`) into its base: a plain remote-code MLLMSeg checkpoint."""
from __future__ import annotations

import json
import os
from pathlib import Path


def adapter_base_path(adapter_dir: str | Path) -> str:
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: ADAPTER_DIR must hold a PEFT adapter (e.g. <run>/final)")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} names no base model (base_model_name_or_path)")
    return base


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, dtype=None):
    """The base MLLMSeg model with the adapter on top (a `PeftModel`, eval mode)."""
    from peft import PeftModel

    from ..remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

    base = base or adapter_base_path(adapter_dir)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"base model folder {base} (from the adapter config) not found; pass --base")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = MLLMSegForConditionalGeneration.from_pretrained(base, **kwargs)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def merge_adapter_checkpoint(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype=None) -> Path:
    """Write `out_dir`: merged weights (`save_pretrained`, remote code) + the processor (from the adapter folder,
    else from the base)."""
    from ..remote_code.processing_mllmseg import MLLMSegProcessor

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = base or adapter_base_path(adapter_dir)
    merged = load_adapter_model(adapter_dir, base, dtype=dtype).merge_and_unload()
    merged.save_pretrained(out_dir)
    source = adapter_dir if (adapter_dir / "processor_config.json").is_file() or (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    MLLMSegProcessor.from_pretrained(str(source)).save_pretrained(out_dir)
    return out_dir


__all__ = ["merge_adapter_checkpoint", "load_adapter_model", "adapter_base_path"]
