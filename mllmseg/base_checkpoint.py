"""Start an MLLMSeg model from a base InternVL checkpoint in the transformers-native layout.

That is what `InternVLForConditionalGeneration.save_pretrained` writes (e.g. the `OpenGVLab/InternVL*-hf` releases):
keys either in transformers' legacy names (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`,
`multi_modal_projector.*`, what `save_pretrained` writes by default) or in the native ones (`model.*`, `lm_head.*`).
Original-layout InternVL checkpoints (`InternVLChatModel`: `llm_config`, `vision_model.*`, `mlp1.*`) go through
`mllmseg convert-internvl` instead (`mllmseg convert-upstream` for MLLMSeg releases, which add `res_decoder.*`).
"""
from __future__ import annotations

from pathlib import Path

import json

import torch
from transformers import AutoConfig, AutoTokenizer

from .remote_code.configuration_mllmseg import ADDED_TOKENS, MLLMSegConfig, token_id_fields
from .remote_code.modeling_mllmseg import MLLMSegForConditionalGeneration

# transformers' legacy InternVL names -> this model's names. Without the lm_head entry the base lm_head would be
# silently dropped and re-initialised (SPEC section 7).
INTERNVL_KEY_MAPPING = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.model\.": "model.language_model.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
}


def add_mllmseg_tokens(tokenizer) -> list[int]:
    """Add the image tokens (where absent), `[SEG]` and `[REJ]` as special tokens; returns the ids that are new."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ADDED_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer.convert_tokens_to_ids(missing)


@torch.no_grad()
def init_new_token_rows(model, new_ids: list[int], old_rows: int) -> None:
    """Grow the embeddings to the tokenizer and set the rows of new tokens to the mean of the old rows.

    The reference sets new *output* rows to the mean; we do the same for the input rows (the reference leaves them
    to `resize_token_embeddings`' default), so that a new token starts as an "average" token on both sides.
    """
    needed = max(new_ids) + 1 if new_ids else 0
    if needed > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(needed, mean_resizing=False)
    keep = torch.ones(old_rows, dtype=torch.bool)
    keep[[i for i in new_ids if i < old_rows]] = False
    ids = torch.tensor(new_ids, dtype=torch.long)
    embeddings = [model.get_input_embeddings().weight]
    if model.get_output_embeddings().weight is not embeddings[0]:
        embeddings.append(model.get_output_embeddings().weight)
    for weight in embeddings:
        weight[ids] = weight[:old_rows][keep].float().mean(0).to(weight.dtype)


def set_chat_generation_defaults(model, tokenizer) -> None:
    """Plain `model.generate()` stops at the end of an assistant turn (`<|im_end|>`, as InternVL's chat stops) and
    pads with the tokenizer's pad token; written to `generation_config.json` on save."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <|im_end|> token: not an InternVL2.5 chat tokenizer")
    model.generation_config.eos_token_id = end_of_turn
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _refuse_original_layout(base: str | Path) -> None:
    """An original-layout folder (InternVLChatConfig: `llm_config`, `auto_map` to the release's own code) would make
    `AutoConfig` ask to run that code; say which converter reads it instead."""
    path = Path(base) / "config.json"
    if not path.is_file():
        return  # a Hub id, or no config: AutoConfig reports it
    config = json.loads(path.read_text())
    if "llm_config" in config or config.get("model_type") == "internvl_chat":
        raise ValueError(
            f"{path}: an original-layout InternVL checkpoint (model_type {config.get('model_type')!r}, llm_config, "
            f"architectures {config.get('architectures')}); from_internvl reads the transformers layout (-hf). "
            f"Convert it with `mllmseg convert-internvl {base} OUT` (a base) or `mllmseg convert-upstream {base} OUT` "
            "(an MLLMSeg release with res_decoder weights)"
        )


def from_internvl(base: str | Path, tokenizer=None, **config_overrides):
    """Build `(model, tokenizer)`: every base weight kept (`lm_head` included), `[SEG]`/`[REJ]` added, new token
    rows at the mean of the old ones, the mask decoder initialised as the reference (xavier-uniform).

    Args:
        base: a folder (or Hub id, when online) holding an InternVL checkpoint in the transformers layout
            (`OpenGVLab/InternVL*-hf`). Original-layout folders (`InternVLChatModel`) are refused with a pointer to
            `mllmseg convert-internvl`.
        tokenizer: use this tokenizer instead of the base's.
        config_overrides: `MLLMSegConfig` fields to set (loss weights, `seg_tiling`, ...).
    """
    _refuse_original_layout(base)
    base_config = AutoConfig.from_pretrained(base)
    if base_config.model_type not in ("internvl", "mllmseg"):
        raise ValueError(f"{base}: expected an InternVL checkpoint (model_type 'internvl'), got {base_config.model_type!r}")
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base)
    new_ids = add_mllmseg_tokens(tokenizer)
    fields = base_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    fields.update(
        **token_id_fields(tokenizer),
        tie_word_embeddings=bool(getattr(base_config, "tie_word_embeddings", False))
        and bool(getattr(base_config.get_text_config(), "tie_word_embeddings", True)),
    )
    fields.update(config_overrides)
    config = MLLMSegConfig(**fields)
    model = MLLMSegForConditionalGeneration.from_pretrained(base, config=config, key_mapping=INTERNVL_KEY_MAPPING)
    init_new_token_rows(model, new_ids, old_rows=config.text_config.vocab_size)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    set_chat_generation_defaults(model, tokenizer)
    return model, tokenizer
