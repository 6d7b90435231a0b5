# Copyright 2025 The mllmseg authors. Licensed under the Apache License, Version 2.0.
"""Image processor for MLLMSeg (InternVL-style tiling, PIL/NumPy only).

This file travels inside model checkpoints as Hugging Face remote code: it imports only the standard library,
NumPy, PIL, torch and transformers (never the rest of the `mllmseg` package, and never torchvision).

Two tiling modes:

* ``"dynamic"``: the InternVL / model-card dynamic tiling. The image is resized (bicubic) to the tile grid whose
  aspect ratio is closest to the image's (between ``min_tiles`` and ``max_tiles`` tiles), cut into tiles in row-major
  order, and, when there is more than one tile, a thumbnail (the whole image resized to one tile) is appended.
* ``"single"``: one bicubic square resize to one tile, no thumbnail. This is how the released MLLMSeg checkpoints
  were trained and evaluated.

Both modes then scale to [0, 1] and normalise with the ImageNet mean/std, giving float32 values bit-identical to
the model-card reference (``dynamic_tiles`` + ``normalize``).

Why not the stock ``GotOcr2ImageProcessorPil`` pipeline? With InternVL settings it cuts exactly the same tiles, and
we reuse its grid choice (``get_optimal_tiled_canvas``) so the tiling decision is the transformers one. But its
pipeline round-trips every tile numpy -> PIL -> numpy and rescales tile by tile through float64, which runs at about
the reference's speed. Here the image is resized once with PIL (the same call, so the same uint8 pixels), the tiles
are reshaped views of its bands, and each tile plane is cast and normalised in place, in float32, straight into one
output buffer (about 1.5-1.8x the reference's images/second, see benchmarks/bench_preprocessing.py).
"""

import io
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType


try:  # torch is optional for this file: without it, use return_tensors="np".
    import torch
except ImportError:  # pragma: no cover - torch is always installed with mllmseg
    torch = None


__all__ = [
    "ALPHA_BACKGROUND",
    "TILING_MODES",
    "URL_TIMEOUT",
    "ImageLoadError",
    "ImageTooLargeError",
    "MAX_URL_BYTES",
    "MLLMSegImageProcessor",
    "MLLMSegImageProcessorKwargs",
    "check_pixels",
    "is_url",
    "load_image",
    "to_rgb",
]

TILING_MODES = ("dynamic", "single")

# Colour that transparent pixels are composited onto (white, as transformers' `convert_to_rgb` does).
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


class ImageLoadError(OSError, ValueError):
    """An image file or object could not be read or converted to RGB.

    Subclasses both `OSError` (what Pillow raises for unreadable files) and `ValueError` (bad input), so callers can
    catch either. The message names the file when there is one.
    """


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`)."""


# --------------------------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# --------------------------------------------------------------------------------------------------------------------


def _scale_16bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 by rounding v * 255 / 65535 (= v / 257); values outside the range are clipped first.

    Pillow's own `convert("L")` from 16-bit modes clips everything above 255 to white, which destroys 16-bit images.
    """
    v = np.clip(values.astype(np.int64), 0, 65535)
    # Integer round-half-up of v * 255 / 65535; exact ties cannot occur because 65535 = 255 * 257.
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_background(image: Image.Image) -> Image.Image:
    """Alpha-composite onto `ALPHA_BACKGROUND` and drop the alpha channel."""
    if image.mode == "La":  # premultiplied grey + alpha: Pillow converts it to LA only
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image, name: str | None = None) -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB.

    Rules:

    * ``RGB``: returned unchanged (no copy).
    * ``L``, ``1``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``...: Pillow's ``convert("RGB")``.
      For CMYK this is ``R = (255 - C) * (255 - K) / 255`` (same for G/M, B/Y); embedded ICC profiles are ignored.
    * Images with transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, ``P`` or ``L``/``RGB`` with a
      ``transparency`` entry): alpha-composited onto white (``ALPHA_BACKGROUND``), then alpha is dropped. So
      transparent pixels become white whatever colour they store, like transformers' ``convert_to_rgb``.
      (The InternVL model card's ``convert("RGB")`` would instead show the stored colour, often black.)
    * 16-bit (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer ``I`` (how Pillow opens some 16-bit
      PNG/TIFF files): scaled from 0..65535 to 0..255 (``round(v / 257)``, values outside clipped), not clipped at
      255 as Pillow's ``convert`` does.
    * ``F`` (32-bit float): Pillow's conversion, i.e. values on the 0..255 scale, clipped.

    Args:
        image (`PIL.Image.Image`): the image.
        name (`str`, *optional*): file name used in error messages.

    Returns:
        `PIL.Image.Image` in mode ``RGB``, same size.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    where = f" ({name})" if name else ""
    try:
        if mode in _SIXTEEN_BIT_MODES:  # before the alpha rule: Pillow's RGBA conversion would clip these too
            gray = _scale_16bit_to_8bit(np.asarray(image))
            return Image.fromarray(gray, mode="L").convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return _composite_on_background(image)
        if mode == "F":
            return image.convert("L").convert("RGB")
        return image.convert("RGB")
    except Exception as err:  # Pillow raises ValueError/OSError for unsupported conversions
        raise ImageLoadError(f"Cannot convert image of mode {mode!r}{where} to RGB: {err}") from err


def _bomb_message(source: str, err: Exception) -> str:
    return (
        f"{source[:1].upper() + source[1:]} is over Pillow's decompression-bomb limit of PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} "
        f"pixels ({err}). If the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) before loading."
    )


def check_pixels(width: int, height: int, max_pixels: int | None, source: str = "Image") -> None:
    """Refuse an image of more than `max_pixels` pixels (None: no limit beyond Pillow's own) with an
    `ImageTooLargeError` naming `source`, its size and the limit. Called on the header's size, before decoding."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{source[:1].upper() + source[1:]} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels"
        )


def _decode(stream, source: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode an image from a path or a binary stream, turning every failure into an error that
    names `source`; the size limits are checked on the header, before any pixel is decoded."""
    try:
        # Pillow warns between MAX_IMAGE_PIXELS and 2x and raises above 2x. Both mean "over the limit": treat the
        # warning as an error so a 150 MP file fails up front instead of silently using gigabytes.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                check_pixels(image.width, image.height, max_pixels, source)
                image.load()  # decode now, inside the try, so truncated files fail here and name the file
                return image
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(_bomb_message(source, err)) from err
    except Exception as err:  # UnidentifiedImageError, truncated data, plugin errors (SyntaxError, struct.error...)
        verb = "read" if isinstance(stream, str) else "decode"
        raise ImageLoadError(f"Cannot {verb} {source}: {type(err).__name__}: {err}") from err


def _open_file(path: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file (errors name the file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, "Image file not found", path)
    return _decode(path, f"image file {path!r}", max_pixels)


# --------------------------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------------------------

# Seconds to wait for the connection and for each read of an image URL (transformers' `load_image` passes no
# timeout by default, so a server that never answers would hang the caller).
URL_TIMEOUT = 10.0
# Largest download accepted from an image URL, in bytes (the pixel limits apply on top, once the header is read).
MAX_URL_BYTES = 256 * 2**20
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _offline_variable() -> str | None:
    """The variable that turns offline mode on, read now (huggingface_hub reads it once, at import)."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return name
    return None


def _fetch_url(url: str, timeout: float | None = None) -> bytes:
    """The bytes at an http(s) URL, or an `ImageLoadError` naming the URL. In offline mode nothing is fetched (no
    connection is even attempted)."""
    offline = _offline_variable()
    if offline:
        raise ImageLoadError(
            f"Cannot fetch image URL {url!r}: offline mode is on ({offline}={os.environ[offline]}); download the file "
            f"and pass its path, or unset {offline}"
        )
    import httpx  # a transformers dependency; imported only when a URL is fetched

    timeout = URL_TIMEOUT if timeout is None else float(timeout)
    chunks, size = [], 0
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ImageLoadError(f"Cannot fetch image URL {url!r}: HTTP {response.status_code} "
                                     f"{response.reason_phrase}")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_URL_BYTES:
                    raise ImageTooLargeError(f"Image URL {url!r} sends more than MAX_URL_BYTES={MAX_URL_BYTES} bytes")
                chunks.append(chunk)
    except httpx.TimeoutException as err:
        raise ImageLoadError(f"Cannot fetch image URL {url!r}: timed out after {timeout} s "
                             f"({type(err).__name__})") from err
    except httpx.HTTPError as err:  # refused connections, DNS failures, bad URLs, protocol errors
        raise ImageLoadError(f"Cannot fetch image URL {url!r}: {type(err).__name__}: {err}") from err
    return b"".join(chunks)


def _array_to_pil(array: np.ndarray, channels_first: bool | None = None) -> Image.Image:
    """Wrap an image array as a PIL image.

    Accepted layouts: ``[H, W]`` (grayscale), ``[H, W, C]`` and, when ``channels_first`` (or when only the first axis
    can be channels), ``[C, H, W]``, with C in {1, 3, 4} (4 = RGBA). Accepted dtypes: uint8; bool; uint16 (16-bit,
    scaled to 8 bits); floats in [0, 1] (scaled by 255 and rounded); other integers already in 0..255.
    """
    if array.ndim == 3:
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if channels_first is None:
            channels_first = first and not last
        if channels_first:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] == 1:
            array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(
            f"Expected an image array of shape [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4), got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"Image array has an empty side: shape {array.shape}")

    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _scale_16bit_to_8bit(array)
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ImageLoadError(
                f"Float image array has {int((~finite).sum())} non-finite values (NaN / inf), the first "
                f"{array[bad]} at index {bad}"
            )
        if array.min() < 0.0 or array.max() > 1.0:
            raise ImageLoadError(
                f"Float image arrays must hold values in [0, 1]; got range [{array.min()}, {array.max()}]. "
                "Pass uint8 arrays for 0..255 data."
            )
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ImageLoadError(
                f"Integer image arrays of dtype {array.dtype} must hold values in 0..255 "
                f"(got [{array.min()}, {array.max()}]); use uint16 for 16-bit data."
            )
        array = array.astype(np.uint8)
    else:
        raise ImageLoadError(f"Unsupported image array dtype {array.dtype}")

    mode = "L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def load_image(image: Any, exif_transpose: bool = True, timeout: float | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Load one image from any supported source and return it as an 8-bit RGB PIL image.

    Args:
        image: one of
            - a file path (`str` or `os.PathLike`);
            - an ``http(s)://`` URL, fetched unless offline mode is on (``HF_HUB_OFFLINE`` or
              ``TRANSFORMERS_OFFLINE``, read at each call: then it is refused before any connection);
            - encoded file bytes (`bytes`);
            - a `PIL.Image.Image` of any mode (see `to_rgb` for the conversion rules);
            - a NumPy array ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (uint8, bool, uint16, or float in [0, 1]);
            - a torch tensor, same rules (3-D tensors are read as ``[C, H, W]`` when the first axis is 1/3/4).
        exif_transpose (`bool`, *optional*, defaults to `True`): apply the EXIF orientation tag, so that a phone
            photo is read in the frame a viewer sees (as Gradio, browsers and image viewers show it) and masks come
            back in that frame. (InternVL's model card does not; the dataset loaders keep the stored frame, in which
            COCO-style annotations are drawn, and check the image size against the annotation file.)
        timeout (`float`, *optional*, defaults to `URL_TIMEOUT`): seconds to wait for a URL's connection and each
            read. (transformers' `load_image` waits forever by default.)
        max_pixels (`int`, *optional*): refuse images of more pixels (files, bytes and URLs before decoding), on top
            of Pillow's decompression-bomb limit.

    Returns:
        `PIL.Image.Image` in mode ``RGB``.

    Raises:
        FileNotFoundError: the path does not exist (the message names it).
        ImageTooLargeError: over ``PIL.Image.MAX_IMAGE_PIXELS`` or `max_pixels`, or a URL over `MAX_URL_BYTES`
            (names the source and the limit).
        ImageLoadError: unreadable/corrupt file (names the file), a URL that cannot be fetched (names the URL and
            why: offline, HTTP status, timeout), an empty image, unsupported array or mode.
        TypeError: not an image type.
    """
    name = None
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if is_url(name):
            image = _decode(io.BytesIO(_fetch_url(name, timeout)), f"image URL {name!r}", max_pixels)
        else:
            image = _open_file(name, max_pixels)
    elif isinstance(image, (bytes, bytearray)):
        name = "<bytes>"
        image = _decode(io.BytesIO(image), "image bytes", max_pixels)
    elif torch is not None and isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.float16, torch.bfloat16):  # no NumPy equivalent for bfloat16
            tensor = tensor.float()
        # torch's convention is channels-first, so a leading axis of 1/3/4 is read as channels.
        image = _array_to_pil(tensor.numpy(), channels_first=tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4))
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: expected a path, URL, bytes, PIL image, NumPy array or "
            "tensor"
        )
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"Image{f' {name!r}' if name else ''} is empty: {image.width}x{image.height} pixels")
    check_pixels(image.width, image.height, max_pixels, f"Image {name!r}" if name else "Image")
    if exif_transpose and image.getexif().get(0x0112, 1) != 1:  # 0x0112: Orientation (1: as stored)
        image = ImageOps.exif_transpose(image)
    return to_rgb(image, name=name)


def _load_item(image: Any, where: str) -> Image.Image:
    """`load_image` for one item of a batch: an error keeps its type and gains the item's place (`images[3]: ...`)."""
    try:
        return load_image(image)
    except (OSError, ValueError, TypeError) as err:
        try:
            if isinstance(err, OSError) and err.errno is not None:  # FileNotFoundError(errno, strerror, filename)
                named = type(err)(err.errno, f"{where}: {err.strerror}", err.filename)
            else:
                named = type(err)(f"{where}: {err}")
        except Exception:  # an error type with another constructor: keep it as it is
            raise err from None
        raise named from err


# --------------------------------------------------------------------------------------------------------------------
# Exact, fast rescale
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _exact_rescale_divisor(rescale_factor: float) -> float | None:
    """A float32 divisor ``d`` such that ``float32(v) / d`` equals transformers' rescale of every uint8 ``v``.

    transformers rescales as ``float32(float64(v) * rescale_factor)``; the model-card reference computes
    ``float32(v) / 255``. For 1/255 both agree on all 256 values, and a float32 division is ~1.7x cheaper than the
    float64 round trip, so use it when (and only when) it is exact. All our inputs are uint8, so checking the 256
    possible values is a proof, not a sample.
    """
    if rescale_factor == 0:
        return None
    values = np.arange(256, dtype=np.float32)
    target = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    divisor = np.float32(round(1.0 / rescale_factor))
    return float(divisor) if np.array_equal(values / divisor, target) else None


def _write_tiles(
    image: Image.Image,
    out: np.ndarray,
    rows: int,
    cols: int,
    divisor: float | None,
    rescale_factor: float | None,
    mean: np.ndarray | None,
    std: np.ndarray | None,
) -> None:
    """Cut an RGB PIL image into a `rows x cols` grid of tiles and write them, normalised, row-major into `out`.

    Args:
        image: RGB image of size `(cols * tile_w, rows * tile_h)`.
        out: float32 `[rows * cols, 3, tile_h, tile_w]`, written in place.
        divisor: rescale by float32 division by this value (exact fast path), or
        rescale_factor: rescale by transformers' float64 multiply (when `divisor` is None); both None: no rescale.
        mean, std: float32 `[3]`, or None for no normalisation.

    The arithmetic is the reference's, step by step in float32: `x / 255`, then `(x - mean) / std`. Two choices
    make it fast without changing a bit:

    * the image is read band by band (`split()` -> planar uint8 arrays) instead of one `np.asarray` of the packed
      RGB canvas: the copy then runs along contiguous rows and no temporary exceeds one band (the packed canvas,
      up to 7 MB, cost more in fresh-memory page faults than all the rest of the copy);
    * each tile plane (`tile_h * tile_w` floats, 0.8 MB at 448 px) is cast and normalised while it sits in the CPU
      cache, rather than in passes over the whole output (measured ~10% faster per image).
    """
    tile_h, tile_w = out.shape[-2:]
    for channel, band in enumerate(image.split()):
        planes = np.asarray(band).reshape(rows, tile_h, cols, tile_w)
        for row in range(rows):
            for col in range(cols):
                plane = out[row * cols + col, channel]
                np.copyto(plane, planes[row, :, col])  # uint8 -> float32
                if divisor is not None:
                    np.divide(plane, np.float32(divisor), out=plane)
                elif rescale_factor is not None:
                    np.multiply(plane, np.float64(rescale_factor), out=plane, casting="unsafe")
                if mean is not None:
                    np.subtract(plane, mean[channel], out=plane)
                    np.divide(plane, std[channel], out=plane)


# --------------------------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------------------------


class MLLMSegImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    tiling (`str`, *optional*, defaults to `self.tiling`):
        `"dynamic"` (InternVL tiling + thumbnail) or `"single"` (one square resize, no thumbnail).
    min_tiles (`int`, *optional*, defaults to `self.min_tiles`):
        Minimum number of grid tiles in dynamic mode (thumbnail not counted).
    max_tiles (`int`, *optional*, defaults to `self.max_tiles`):
        Maximum number of grid tiles in dynamic mode (thumbnail not counted).
    use_thumbnail (`bool`, *optional*, defaults to `self.use_thumbnail`):
        In dynamic mode, append a whole-image thumbnail tile when the grid has more than one tile.
    """

    tiling: str | None
    min_tiles: int | None
    max_tiles: int | None
    use_thumbnail: bool | None


class MLLMSegImageProcessor(PilBackend):
    r"""
    Image processor of MLLMSeg: InternVL dynamic tiling or a single square tile, bicubic, ImageNet mean/std.

    Args:
        tiling (`str`, *optional*, defaults to `"dynamic"`):
            `"dynamic"`: InternVL / model-card tiling (grid of `min_tiles`..`max_tiles` tiles chosen by aspect ratio,
            row-major, plus a thumbnail when there is more than one tile). `"single"`: one bicubic square resize to
            the tile size and no thumbnail, as the released MLLMSeg checkpoints were trained and evaluated.
        tile_size (`int`, *optional*):
            Side of a square tile in pixels; must equal the vision model's `image_size` (448 for InternViT-300M-448px).
            Shorthand for `size={"height": tile_size, "width": tile_size}`.
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 448, "width": 448}`):
            Tile size (the standard transformers name; `tile_size` wins if both are given).
        min_tiles (`int`, *optional*, defaults to 1), max_tiles (`int`, *optional*, defaults to 12):
            Bounds on the number of grid tiles in dynamic mode (the thumbnail is not counted).
        use_thumbnail (`bool`, *optional*, defaults to `True`):
            Append a thumbnail tile in dynamic mode when the grid has more than one tile.
        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`), image_mean, image_std, do_rescale,
        rescale_factor, do_normalize: as in every transformers image processor. (`do_resize` and `do_convert_rgb`
        are kept for compatibility but always apply: the model needs RGB tiles of the tile size.)

    The class default is `"dynamic"` (InternVL behaviour, chat); processors built for segmentation with the released
    weights should be saved with `tiling="single"` (e.g. from the model config's segmentation tiling).

    Calling the processor (`processor(images, **overrides)`) accepts one image or a list (paths, bytes, PIL images of
    any mode, NumPy arrays, torch tensors; see `load_image`), any constructor setting as a per-call override
    (e.g. `tiling="single"`, `max_tiles=6`) and `return_tensors` (`"pt"`, the default, or `"np"`), and returns a
    `BatchFeature` with, for N images:

        - `pixel_values`: float32 `[total_tiles, 3, H_tile, W_tile]`, the tiles of all images concatenated in order
          (for each image its grid tiles row-major, then its thumbnail if any);
        - `num_tiles`: int64 `[N]`, tiles per image including the thumbnail (`pixel_values.split(num_tiles)`);
        - `tile_grids`: int64 `[N, 2]`, `(rows, cols)` of each image's tile grid (`(1, 1)` in single mode);
        - `original_sizes`: int64 `[N, 2]`, `(height, width)` of each image as loaded.
    """

    valid_kwargs = MLLMSegImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 448, "width": 448}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    tiling = "dynamic"
    min_tiles = 1
    max_tiles = 12
    use_thumbnail = True

    def __init__(self, tile_size: int | None = None, **kwargs: Unpack[MLLMSegImageProcessorKwargs]):
        if tile_size is not None:
            kwargs["size"] = {"height": int(tile_size), "width": int(tile_size)}
        super().__init__(**kwargs)
        self._validate_preprocess_kwargs(
            tiling=self.tiling, min_tiles=self.min_tiles, max_tiles=self.max_tiles, size=self.size
        )

    @property
    def tile_size(self) -> int:
        """Tile side in pixels (tiles are square unless `size` was set to a non-square dict)."""
        return int(self.size.height)

    # ----------------------------------------------------------------------------------------------------------------
    # Grid helpers (usable without any pixels, e.g. to count image tokens)
    # ----------------------------------------------------------------------------------------------------------------

    def get_tile_grid(
        self, height: int, width: int, tiling: str | None = None, min_tiles: int | None = None,
        max_tiles: int | None = None,
    ) -> tuple[int, int]:
        """`(rows, cols)` of the tile grid for an image of this size (`(1, 1)` in single mode)."""
        tiling = tiling or self.tiling
        if tiling == "single":
            return 1, 1
        min_tiles = self.min_tiles if min_tiles is None else min_tiles
        max_tiles = self.max_tiles if max_tiles is None else max_tiles
        # transformers' InternVL/GOT-OCR2 grid choice (same candidate order and tie-break as the model card).
        cols, rows = get_optimal_tiled_canvas(
            (int(height), int(width)), (self.size.height, self.size.width), int(min_tiles), int(max_tiles)
        )
        return rows, cols

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Number of tiles (thumbnail included) for an image of this size, honouring per-call overrides."""
        images_kwargs = images_kwargs or {}
        tiling = images_kwargs.get("tiling") or self.tiling
        rows, cols = self.get_tile_grid(
            height, width, tiling, images_kwargs.get("min_tiles"), images_kwargs.get("max_tiles")
        )
        use_thumbnail = images_kwargs.get("use_thumbnail", self.use_thumbnail)
        return rows * cols + int(tiling == "dynamic" and bool(use_thumbnail) and rows * cols > 1)

    # ----------------------------------------------------------------------------------------------------------------
    # transformers pipeline hooks
    # ----------------------------------------------------------------------------------------------------------------

    def preprocess(self, images: Any, **kwargs: Unpack[MLLMSegImageProcessorKwargs]) -> BatchFeature:
        """Tile and normalise one image or a list of images (see the class docstring for inputs and outputs)."""
        return super().preprocess(images, **kwargs)

    def _validate_preprocess_kwargs(self, tiling=None, min_tiles=None, max_tiles=None, size=None, **kwargs):
        super()._validate_preprocess_kwargs(size=size, **kwargs)
        if tiling not in TILING_MODES:
            raise ValueError(f"tiling must be one of {TILING_MODES}, got {tiling!r}")
        if not (isinstance(min_tiles, int) and isinstance(max_tiles, int) and 1 <= min_tiles <= max_tiles):
            raise ValueError(
                f"Need integers 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
            )
        if size is None or not size.height or not size.width:
            raise ValueError(f"size must give the tile 'height' and 'width', got {size}")

    def _prepare_image_like_inputs(self, images: Any, *args, **kwargs) -> list[Image.Image]:
        """Flatten the input to a list and load every item as an RGB PIL image (no numpy round trip).

        Accepts one image, a list/tuple (nested lists are flattened in order, as for multi-image batches), or a
        4-D array/tensor read as a batch of images.
        """
        items = []

        def flatten(value):
            if isinstance(value, (list, tuple)):
                for item in value:
                    flatten(item)
            elif (isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))) and (
                value.ndim == 4
            ):
                items.extend(value)
            else:
                items.append(value)

        flatten(images)
        if not items:
            raise ValueError("No images given")
        if len(items) == 1 and not isinstance(images, (list, tuple)):
            return [load_image(items[0])]
        return [_load_item(item, f"images[{i}]") for i, item in enumerate(items)]

    def _preprocess(
        self,
        images: list[Image.Image],
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        return_tensors: str | TensorType | None,
        tiling: str,
        min_tiles: int,
        max_tiles: int,
        use_thumbnail: bool,
        **kwargs,
    ) -> BatchFeature:
        tile_h, tile_w = int(size.height), int(size.width)
        resample = PILImageResampling.BICUBIC if resample is None else resample

        # Pass 1: grids and tile counts, so one output buffer holds every tile (no per-tile arrays, no final stack).
        grids, counts = [], []
        for image in images:
            rows, cols = self.get_tile_grid(image.height, image.width, tiling, min_tiles, max_tiles)
            grids.append((rows, cols))
            counts.append(rows * cols + int(tiling == "dynamic" and use_thumbnail and rows * cols > 1))
        pixel_values = np.empty((sum(counts), 3, tile_h, tile_w), dtype=np.float32)

        # Pass 2, per image: one PIL resize to the whole grid canvas (the model card's exact call, hence identical
        # uint8 pixels), cut into tiles and normalised straight into the output.
        norm = dict(divisor=None, rescale_factor=None, mean=None, std=None)
        if do_rescale:
            norm["divisor"] = _exact_rescale_divisor(float(rescale_factor))
            norm["rescale_factor"] = float(rescale_factor)
        if do_normalize:
            norm["mean"] = np.broadcast_to(np.asarray(image_mean, dtype=np.float32), (3,))
            norm["std"] = np.broadcast_to(np.asarray(image_std, dtype=np.float32), (3,))
        start = 0
        for image, (rows, cols), count in zip(images, grids, counts):
            canvas_size = (cols * tile_w, rows * tile_h)
            # PIL's resize to the current size is a plain copy, so skipping it changes nothing.
            canvas = image if image.size == canvas_size else image.resize(canvas_size, resample)
            _write_tiles(canvas, pixel_values[start : start + rows * cols], rows, cols, **norm)
            if count > rows * cols:  # thumbnail: the original image resized to one tile, as the model card does
                thumb = image if image.size == (tile_w, tile_h) else image.resize((tile_w, tile_h), resample)
                _write_tiles(thumb, pixel_values[start + rows * cols : start + count], 1, 1, **norm)
            start += count

        data = {
            "pixel_values": pixel_values,
            "num_tiles": np.asarray(counts, dtype=np.int64),
            "tile_grids": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
            "original_sizes": np.asarray([(im.height, im.width) for im in images], dtype=np.int64).reshape(-1, 2),
        }
        # Tensors by default: the model consumes torch tensors, and BatchFeature wraps arrays without copying.
        return BatchFeature(data=data, tensor_type=return_tensors or TensorType.PYTORCH)

