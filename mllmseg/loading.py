"""Loading a checkpoint for the commands and the demo: one place, one set of checks and errors."""
from __future__ import annotations

from pathlib import Path


def check_model_path(model: str) -> None:
    """A missing local folder is a user error; a string shaped like `owner/name` may be a Hub id, so let it through
    (from_pretrained then says whether it is reachable)."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model must be a checkpoint folder, got a file: {model}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model folder {model}: not a checkpoint")
        return
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return
    raise FileNotFoundError(f"model folder not found: {model}")


def load_model(model_path: str, dtype: str = "auto", cpu: bool = False, device=None):
    """AutoModel + AutoProcessor with trust_remote_code=True (the checkpoint's own code), evaluation mode, on
    `device` (default: the GPU when there is one, unless `cpu`). Returns (model, processor)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=torch_dtype).eval()
    if device is None and not cpu and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model, processor


def read_image(path: str, max_pixels: int | None = None):
    """The image at a file path or an http(s) URL as RGB, through the image processor's own loader (EXIF
    orientation applied; URLs refused in offline mode, fetched with a timeout otherwise), or a one-line error
    (missing, not an image, truncated, over Pillow's decompression-bomb limit or over `max_pixels`, checked on the
    header before decoding)."""
    from .remote_code.image_processing_mllmseg import is_url, load_image

    if not is_url(path) and not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return load_image(path, max_pixels=max_pixels)  # raises ImageLoadError (a ValueError) with the reason


__all__ = ["check_model_path", "load_model", "read_image"]
