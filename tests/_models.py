"""Helpers shared by the model tests: tiny models and hand-built inputs (no processor involved)."""
import torch

from mllmseg.tiny import build_tiny_model


def image_text(model, n_tiles: int, text: str) -> str:
    """`<img>` + `<IMG_CONTEXT>` per tile + `</img>` then the text, as the processor expands `<image>`."""
    return "<img>" + "<IMG_CONTEXT>" * (model.config.tokens_per_tile * n_tiles) + "</img>\n" + text


def batch_inputs(model, tokenizer, specs, seed=0):
    """specs: list of (n_tiles, text). Returns tokenizer output + pixel_values for all tiles."""
    texts = [image_text(model, n, t) for n, t in specs]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    enc["pixel_values"] = torch.randn(sum(n for n, _ in specs), 3, size, size, generator=g)
    return enc


def tiny(text_model_type="qwen2", seed=0, **kwargs):
    return build_tiny_model(seed=seed, text_model_type=text_model_type, **kwargs)
