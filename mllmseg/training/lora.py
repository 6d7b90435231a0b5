"""LoRA for MLLMSeg through PEFT (SPEC section 4, "We" variant).

* LoRA (r 64, alpha 128, dropout 0.05) on every `nn.Linear` of the LLM (`model.language_model`), resolved by module
  type, so the same code covers Qwen2, Llama and other transformers decoders. The ViT (`model.vision_tower`) and the
  projector (`model.multi_modal_projector`) are never targeted and stay frozen.
* Trained in full: the mask decoder and the LLM's final norm (PEFT `modules_to_save`).
* Embeddings: by default only the rows of the new tokens (`[SEG]`, `[REJ]` and any other ids passed), on both the
  input embedding and `lm_head`, through PEFT `trainable_token_indices`; `embeddings="full"` trains both matrices in
  full (the reference recipe), `embeddings="none"` freezes them.
* `vision=True` (SELF1E's `--use_vision_lora`): LoRA on the ViT's linear layers too, with the same r / alpha, and the
  projector trained in full (upstream leaves it trainable in that mode).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from torch import nn

EMBEDDING_MODES = ("new_tokens", "full", "none")
LLM_PREFIX = "model.language_model"
VISION_PREFIX = "model.vision_tower"
PROJECTOR = "multi_modal_projector"
INPUT_EMBEDDINGS = "language_model.embed_tokens"
OUTPUT_EMBEDDINGS = "lm_head"
FINAL_NORM = "language_model.norm"
MASK_DECODER = "mask_decoder"


@dataclass
class LoraRecipe:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    embeddings: str = "new_tokens"
    extra_token_ids: list[int] = field(default_factory=list)
    train_final_norm: bool = True
    vision: bool = False

    def __post_init__(self):
        if self.embeddings not in EMBEDDING_MODES:
            raise ValueError(f"lora embeddings must be one of {EMBEDDING_MODES}, got {self.embeddings!r}")


def _base(model):
    """The MLLMSeg model under a PEFT wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def llm_linear_names(model) -> list[str]:
    """Leaf names of the `nn.Linear` modules of the LLM (e.g. q_proj ... down_proj), found by type."""
    base = _base(model)
    llm = base.get_submodule(LLM_PREFIX)
    names = sorted({name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)})
    if not names:
        raise ValueError(f"no nn.Linear layer found under {LLM_PREFIX}")
    return names


def lora_target_regex(model, vision: bool = False) -> str:
    """A PEFT `target_modules` regex (full match on module names) selecting exactly the LLM's linear layers (and the
    ViT's, with `vision=True`)."""
    leaves = "|".join(re.escape(n) for n in llm_linear_names(model))
    regex = rf"^{re.escape(LLM_PREFIX)}\..*\.(?:{leaves})$"
    if vision:
        vit = _base(model).get_submodule(VISION_PREFIX)
        names = sorted({n.rsplit(".", 1)[-1] for n, m in vit.named_modules() if isinstance(m, nn.Linear)})
        regex = rf"(?:{regex}|^{re.escape(VISION_PREFIX)}\..*\.(?:{'|'.join(re.escape(n) for n in names)})$)"
    return regex


def new_token_ids(config, extra: Iterable[int] = ()) -> list[int]:
    """`[SEG]`, `[REJ]` and `extra` ids, sorted and unique."""
    return sorted({int(config.seg_token_id), int(config.rej_token_id), *(int(i) for i in extra)})


def build_lora_config(model, recipe: LoraRecipe | None = None):
    from peft import LoraConfig

    recipe = recipe or LoraRecipe()
    base = _base(model)
    modules_to_save = [MASK_DECODER]
    if recipe.train_final_norm:
        modules_to_save.append(FINAL_NORM)
    if recipe.vision:
        modules_to_save.append(PROJECTOR)
    trainable_tokens = None
    if recipe.embeddings == "full":
        modules_to_save += [INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS]
    elif recipe.embeddings == "new_tokens":
        ids = new_token_ids(base.config, recipe.extra_token_ids)
        trainable_tokens = {INPUT_EMBEDDINGS: ids, OUTPUT_EMBEDDINGS: ids}
    return LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=lora_target_regex(base, vision=recipe.vision),
        modules_to_save=modules_to_save,
        trainable_token_indices=trainable_tokens,
        bias="none",
    )


def apply_lora(model, recipe: LoraRecipe | None = None):
    """Wrap `model` in a PEFT LoRA model following `recipe`; everything else is frozen."""
    from peft import get_peft_model

    config = build_lora_config(model, recipe)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if recipe is not None and recipe.vision:
            break  # the ViT's LoRA and the projector train by design
        if ".vision_tower." in name or ".multi_modal_projector." in name:
            if param.requires_grad:
                raise AssertionError(f"{name} of the frozen ViT / projector is trainable")
    return peft_model


def trainable_parameter_counts(model) -> dict[str, int]:
    """Trainable parameters by part: lora, mask_decoder, final_norm, embeddings, other; plus total and all."""
    parts = dict.fromkeys(("lora", "mask_decoder", "final_norm", "embeddings", "vision", "other"), 0)
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        if "lora_" in name:
            parts["lora"] += p.numel()
        elif "mask_decoder" in name:
            parts["mask_decoder"] += p.numel()
        elif "embed_tokens" in name or "lm_head" in name or "trainable_tokens" in name:
            parts["embeddings"] += p.numel()
        elif re.search(r"language_model\.norm\b", name):
            parts["final_norm"] += p.numel()
        elif "vision_tower" in name or "multi_modal_projector" in name:
            parts["vision"] += p.numel()
        else:
            parts["other"] += p.numel()
    parts["trainable"] = sum(parts.values())
    parts["all"] = total
    return parts




# ----------------------------------------------------------------------------------------------------------------
# The adapter folder's README (in place of PEFT's boilerplate card)
# ----------------------------------------------------------------------------------------------------------------
def _code_list(values) -> str:
    if not values:
        return "none"
    if isinstance(values, str):
        return f"`{values}`"
    return ", ".join(f"`{v}`" for v in values)


def adapter_card(config: dict, folder_name: str = "ADAPTER_DIR") -> str:
    """A short README for a LoRA adapter folder, from its `adapter_config.json` (as a dict): what it is, its base,
    the LoRA settings, and how to load and merge it. `folder_name` is how the commands name the folder."""
    base = str(config.get("base_model_name_or_path") or "not recorded")
    relative = not os.path.isabs(base) and base.startswith(".")
    where = " (relative to this folder)" if relative else ""
    base_for_code = f"{folder_name}/{base}" if relative else base
    tokens = config.get("trainable_token_indices") or {}
    token_line = "; ".join(f"`{name}` rows {list(ids)}" for name, ids in tokens.items()) or "none"
    rows = [
        ("r", config.get("r")), ("alpha", config.get("lora_alpha")), ("dropout", config.get("lora_dropout")),
        ("target modules", _code_list(config.get("target_modules"))),
        ("trained in full (`modules_to_save`)", _code_list(config.get("modules_to_save"))),
        ("trained embedding rows (`trainable_token_indices`)", token_line),
    ]
    table = "\n".join(["| setting | value |", "|---|---|"] +
                      [f"| {name} | {str(value).replace('|', chr(92) + '|')} |" for name, value in rows])
    return f"""---
library_name: peft
tags:
- mllmseg
- lora
- referring-expression-segmentation
---

# MLLMSeg LoRA adapter

A LoRA adapter (PEFT) made by `mllmseg train`: the LoRA matrices and the modules trained in full, on top of the
MLLMSeg checkpoint `{base}`{where}. It is not a full model: loading it needs that base.

## LoRA settings

{table}

## Use it

The `mllmseg` commands take this folder as MODEL: they load the base, apply the adapter and merge it in memory.

```bash
mllmseg segment {folder_name} photo.png 'the red circle'
```

In Python, with PEFT (the processor is saved in this folder):

```python
from peft import PeftModel
from transformers import AutoModel, AutoProcessor

base = AutoModel.from_pretrained("{base_for_code}", trust_remote_code=True)  # the base above
model = PeftModel.from_pretrained(base, "{folder_name}").merge_and_unload().eval()
processor = AutoProcessor.from_pretrained("{folder_name}", trust_remote_code=True)
```

## Merge it

A plain remote-code checkpoint (no PEFT needed to load it, what `mllmseg release` publishes):

```bash
mllmseg merge-lora {folder_name} merged/ --dtype bfloat16
```
"""


def write_adapter_card(folder: str | os.PathLike, folder_name: str = "ADAPTER_DIR") -> None:
    """Replace the README.md PEFT writes into an adapter folder with `adapter_card` of its adapter_config.json."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    (folder / "README.md").write_text(adapter_card(config, folder_name), encoding="utf-8")


def finish_adapter_folder(folder: str | os.PathLike, final: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """A LoRA adapter saved to `folder` (staged; it becomes `final`): the base path stored relative to `final` when
    the base lies inside `run_dir` (a moved or copied run still finds it; see merge.stored_base_path), and our
    adapter card in place of PEFT's boilerplate README."""
    from .merge import stored_base_path

    config_file = Path(folder, "adapter_config.json")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = stored_base_path(config["base_model_name_or_path"], final, run_dir)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_adapter_card(folder, folder_name=f"{Path(os.path.abspath(run_dir)).name}/{Path(final).name}")
