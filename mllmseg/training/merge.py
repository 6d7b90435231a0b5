"""Merge a LoRA adapter (from `mllmseg train`) into its base: a plain remote-code MLLMSeg checkpoint.

The base is the adapter config's `base_model_name_or_path`: an absolute folder, a folder relative to the adapter
folder (what `mllmseg train` stores when the base lies inside the run folder, so a moved or copied run still
finds it) or a Hub id.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..loading import DTYPES, torch_dtype


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name


def adapter_base_path(adapter_dir: str | Path) -> str:
    """The adapter's base: a local folder (a relative one resolved against `adapter_dir`) or a Hub id, as stored."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: ADAPTER_DIR must hold a PEFT adapter (e.g. <run>/final)")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} names no base model (base_model_name_or_path)")
    return resolve_base_path(base, adapter_dir)


def resolve_base_path(base: str, adapter_dir: str | Path) -> str:
    """`base` as stored in an adapter config -> what to load: absolute paths as they are, a relative path against
    `adapter_dir` (a name like `org/model` that is no folder there is taken for a Hub id)."""
    path = Path(os.path.expanduser(base))
    if path.is_absolute():
        return str(path)
    local = Path(adapter_dir) / path
    if local.is_dir() or not _looks_like_hub_id(base):
        return os.path.normpath(local)
    return base


def base_is_available(base: str) -> bool:
    """A local base folder with a config.json, or a Hub id (from_pretrained says whether it is reachable)."""
    if Path(base).is_dir():
        return (Path(base) / "config.json").is_file()
    return not Path(base).is_absolute() and _looks_like_hub_id(base)


def stored_base_path(base: str | Path, adapter_dir: str | Path, run_dir: str | Path) -> str:
    """What to write as `base_model_name_or_path` for an adapter saved in `adapter_dir`: a base folder inside
    `run_dir` relative to the adapter folder (it moves with the run), anything else absolute (a base elsewhere stays
    where it is when the run folder is moved or copied), a Hub id unchanged."""
    if not Path(base).exists() and _looks_like_hub_id(str(base)):
        return str(base)
    base, adapter_dir, run_dir = (Path(os.path.abspath(p)) for p in (base, adapter_dir, run_dir))
    if base.is_relative_to(run_dir):
        return Path(os.path.relpath(base, adapter_dir)).as_posix()
    return str(base)


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, dtype=None):
    """The base MLLMSeg model with the adapter on top (a `PeftModel`, eval mode). `dtype`: see `torch_dtype`."""
    from peft import PeftModel

    from ..remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

    base = base or adapter_base_path(adapter_dir)
    if not base_is_available(base):
        raise FileNotFoundError(f"base model folder {base} (from {Path(adapter_dir) / 'adapter_config.json'}) not "
                                "found or not a checkpoint (no config.json); pass --base BASE_DIR")
    model = MLLMSegForConditionalGeneration.from_pretrained(base, dtype=torch_dtype(dtype))
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def merge_adapter_checkpoint(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype=None) -> Path:
    """Write `out_dir`: merged weights (`save_pretrained`, remote code) in `dtype` ("auto": the base's) + the
    processor (from the adapter folder, else from the base).

    Everything is loaded first and written into a staging folder beside `out_dir`, which then takes its place: a
    merge that fails (an unreadable processor, a full disk) or is killed leaves `out_dir` as it was (absent, or the
    previous merge whole), never weights without a processor. An existing `out_dir` is replaced."""
    from ..atomic import staged_folder
    from ..remote_code.processing_mllmseg import MLLMSegProcessor

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = base or adapter_base_path(adapter_dir)
    merged = load_adapter_model(adapter_dir, base, dtype=dtype).merge_and_unload()
    if torch_dtype(dtype) != "auto":
        merged = merged.to(torch_dtype(dtype))  # adapter-side modules (trainable token rows, ...) too
    has_processor = any((adapter_dir / name).is_file() for name in ("processor_config.json", "tokenizer_config.json"))
    processor = MLLMSegProcessor.from_pretrained(str(adapter_dir if has_processor else base))
    with staged_folder(out_dir, replace=True) as staging:
        merged.save_pretrained(staging)
        processor.save_pretrained(staging)
    return out_dir


__all__ = ["merge_adapter_checkpoint", "load_adapter_model", "adapter_base_path", "resolve_base_path",
           "base_is_available", "stored_base_path", "torch_dtype", "DTYPES"]
