"""Loading a checkpoint for the commands and the demo: one place, one set of checks and errors.

Also the runtime options the inference commands share (`--device`, `--threads`, the deprecated `--cpu`):
`add_runtime_arguments` adds them to a parser and `apply_runtime_arguments` checks and applies them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEVICE_HELP = ("where the model runs: auto (default: the CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N "
               "or mps")
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")  # the commands' --dtype choices; auto: the checkpoint's own


# ----------------------------------------------------------------------------------------------------------------
# --device / --threads
# ----------------------------------------------------------------------------------------------------------------
def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device`, `--threads` and `--cpu` (a deprecated alias of `--device cpu`). Values are checked by
    `apply_runtime_arguments`, so a bad one is a one-line error rather than argparse's usage block."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--threads", default=None, metavar="N",
                        help="CPU threads for torch (torch.set_num_threads; default: torch's, one per core). On a "
                        "busy machine fewer threads can be much faster: try --threads 1")
    parser.add_argument("--cpu", action="store_true", help="deprecated: the same as --device cpu")


def parse_threads(value) -> int | None:
    """`--threads` as a positive int (None: leave torch's default)."""
    if value is None:
        return None
    try:
        threads = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--threads must be a whole number >= 1, got {value!r}") from None
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    return threads


def resolve_device(spec: str = "auto", cpu: bool = False) -> str:
    """`--device` (and the deprecated `--cpu`) -> a torch device string that exists on this machine.

    "auto" is the CUDA GPU when there is one, else the CPU (mps only when asked for: some ops still fall back).
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if cpu:
        if spec not in ("auto", "cpu"):
            raise ValueError(f"--cpu (deprecated, = --device cpu) contradicts --device {spec}; give only --device")
        return "cpu"
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {spec}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {spec}: Apple's MPS backend is not available here; use --device cpu or auto")
    return str(device)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads, and its inter-op threads where that is still allowed (torch refuses once any
    inter-op work has started; then they are left as they are)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # "cannot set number of interop threads after parallel work has started"
        pass


def apply_runtime_arguments(args) -> str:
    """Check `--device` / `--threads` / `--cpu` on parsed `args`, set the threads and return the device string."""
    threads = parse_threads(getattr(args, "threads", None))
    device = resolve_device(getattr(args, "device", "auto"), getattr(args, "cpu", False))
    if getattr(args, "cpu", False):
        print("mllmseg: --cpu is deprecated; use --device cpu", file=sys.stderr)
    set_threads(threads)
    return device


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and LoRA adapter folders
# ----------------------------------------------------------------------------------------------------------------
def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT adapter folder (what `mllmseg train` with a LoRA recipe writes to `<run>/final`): an
    adapter_config.json and no config.json."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def check_model_path(model: str) -> None:
    """A missing local folder is a user error; a string shaped like `owner/name` may be a Hub id, so let it through
    (from_pretrained then says whether it is reachable). A LoRA adapter folder passes when its base is found."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model must be a checkpoint folder, got a file: {model}")
        if is_adapter_folder(path):
            adapter_base(path)  # the base must be there
            return
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model folder {model}: not a checkpoint (nor a LoRA adapter "
                                    f"folder: no {ADAPTER_CONFIG} either)")
        return
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return
    raise FileNotFoundError(f"model folder not found: {model}")


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model of a LoRA adapter folder (resolved as `mllmseg merge-lora` does), or a one-line error naming
    the path looked for and the way out (`--base` does not exist here: merge the adapter)."""
    from .training.merge import adapter_base_path, base_is_available

    base = adapter_base_path(adapter_dir)
    if not base_is_available(base):
        raise FileNotFoundError(
            f"{adapter_dir} is a LoRA adapter whose base model {base} (from {ADAPTER_CONFIG}) was not found; put the "
            f"base back there, or merge the adapter into a full checkpoint with `mllmseg merge-lora {adapter_dir} "
            "OUT_DIR --base BASE_DIR` and use OUT_DIR")
    return base


def torch_dtype(dtype):
    """"auto" (the checkpoint's own dtype), a dtype name from DTYPES, a torch.dtype or None (= "auto")."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def load_model(model_path: str, dtype: str = "auto", cpu: bool = False, device=None):
    """AutoModel + AutoProcessor with trust_remote_code=True (the checkpoint's own code), evaluation mode, on
    `device` (default: the GPU when there is one, unless `cpu`). Returns (model, processor).

    A LoRA adapter folder loads its base (from adapter_config.json), applies the adapter and merges it in memory
    (inference then runs at the speed of a plain checkpoint); the processor comes from the adapter folder, which
    `mllmseg train` saves it to.
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    if is_adapter_folder(model_path):
        from .training.merge import load_adapter_model

        model = load_adapter_model(model_path, adapter_base(model_path), dtype=dtype).merge_and_unload().eval()
    else:
        model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=torch_dtype(dtype)).eval()
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


__all__ = ["DTYPES", "add_runtime_arguments", "apply_runtime_arguments", "resolve_device", "parse_threads", "set_threads",
           "torch_dtype", "is_adapter_folder", "check_model_path", "adapter_base", "load_model", "read_image"]
