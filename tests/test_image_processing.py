"""MLLMSegImageProcessor: parity with the model-card tiling oracle, single mode, RGB conversion, errors, save/load.

The oracle is `tests/tiling_oracle.py` (the InternVL / MLLMSeg model-card algorithm, written plainly); outputs must be
bit-identical to it (max abs difference exactly 0), not merely close.
"""

import ast
import importlib.util
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mllmseg.remote_code import image_processing_mllmseg as ipm
from mllmseg.remote_code.image_processing_mllmseg import (
    ImageLoadError,
    ImageTooLargeError,
    MLLMSegImageProcessor,
    load_image,
)

from . import tiling_oracle as oracle
from .conftest import REPO_ROOT


def _image(width, height, seed, smooth=True):
    """Seeded RGB test image: smooth random (photo-like) or pure noise (stresses bicubic overshoot/clipping)."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    small = rng.integers(0, 256, (max(1, height // 12), max(1, width // 12), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


# (width, height): tiny, extreme aspect ratios, exact multiples of 448, aspect-ratio ties and area tie-break
# boundaries of the grid choice, and seeded random sizes.
SIZES = [
    (1, 1), (2, 2), (3, 7), (7, 3), (13, 449), (449, 13), (1, 300), (300, 1),
    (2000, 40), (40, 2000), (1000, 50), (50, 1000), (640, 20), (20, 640),
    (448, 448), (896, 448), (448, 896), (1344, 896), (896, 1344), (1792, 448), (224, 224), (447, 449),
    (633, 633), (634, 634),  # area around 0.5 * 448^2 * 4: the 1x1 -> 2x2 tie-break flips here
    (950, 950), (951, 951),  # area around 0.5 * 448^2 * 9: 2x2 -> 3x3
    (625, 500), (600, 400), (500, 1000), (1000, 333), (700, 100), (451, 300), (640, 480), (480, 640),
    (1024, 768), (1280, 720), (720, 1280), (333, 1000),
] + [tuple(int(v) for v in np.random.default_rng(100 + k).integers(16, 1300, size=2)) for k in range(8)]

PHOTOS = [
    "astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "page", "text", "colorwheel",
    "immunohistochemistry", "hubble_deep_field", "moon",
]


@pytest.fixture(scope="module")
def processor():
    return MLLMSegImageProcessor()  # defaults: dynamic, 448, 1..12 tiles, thumbnail


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS}


def _assert_matches_oracle(processor, image, **oracle_kwargs):
    kwargs = dict(min_num=1, max_num=12, image_size=448, use_thumbnail=True)
    kwargs.update(oracle_kwargs)
    expected = oracle.normalize(oracle.dynamic_tiles(image, **kwargs), image_size=kwargs["image_size"])
    cols, rows = oracle.grid_for(*image.size, kwargs["min_num"], kwargs["max_num"], kwargs["image_size"])
    out = processor(image)
    got = out["pixel_values"].numpy()
    assert out["tile_grids"].tolist() == [[rows, cols]], image.size
    assert out["num_tiles"].tolist() == [expected.shape[0]], image.size
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.array_equal(got, expected), f"{image.size}: max abs diff {np.abs(got - expected).max()}"


# ------------------------------------------------------------------------------------------------ dynamic tiling


def test_sizes_cover_the_brief():
    assert len(set(SIZES)) >= 40


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_dynamic_tiles_identical_to_oracle(processor, size):
    w, h = size
    _assert_matches_oracle(processor, _image(w, h, seed=w * 7919 + h, smooth=w * h > 5000))


@pytest.mark.parametrize("name", PHOTOS)
def test_dynamic_tiles_identical_on_real_photos(processor, photos, name):
    # Grayscale photos (camera, coins, ...) go through the same L -> RGB conversion as the oracle's convert("RGB").
    _assert_matches_oracle(processor, photos[name])


def test_grid_choice_matches_oracle_exhaustively():
    """The reused transformers grid choice equals the oracle's on thousands of sizes and tile bounds."""
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, size=(400, 2))]
    sizes += [(w, h) for w in range(1, 40, 3) for h in range(1, 40, 3)] + SIZES
    bounds = [(448, 1, 12), (448, 1, 6), (448, 1, 2), (448, 2, 8), (448, 3, 3), (224, 1, 12), (448, 1, 24)]
    for tile_size, min_tiles, max_tiles in bounds:
        proc = MLLMSegImageProcessor(tile_size=tile_size)
        for w, h in sizes:
            cols, rows = oracle.grid_for(w, h, min_tiles, max_tiles, tile_size)
            assert proc.get_tile_grid(h, w, min_tiles=min_tiles, max_tiles=max_tiles) == (rows, cols), (w, h)


def test_number_of_tiles_without_pixels(processor):
    for w, h in SIZES:
        cols, rows = oracle.grid_for(w, h)
        assert processor.get_number_of_image_patches(h, w) == rows * cols + (rows * cols > 1)
        assert processor.get_number_of_image_patches(h, w, {"use_thumbnail": False}) == rows * cols
        assert processor.get_number_of_image_patches(h, w, {"tiling": "single"}) == 1


def test_matches_stock_transformers_got_ocr2_pipeline(processor):
    """Same pixels as transformers' own GotOcr2ImageProcessorPil with InternVL settings (the slow path we replace)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    stock = GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=12, size={"height": 448, "width": 448},
        image_mean=list(ipm.IMAGENET_DEFAULT_MEAN), image_std=list(ipm.IMAGENET_DEFAULT_STD),
    )
    for w, h in [(451, 300), (2000, 40), (13, 449), (896, 448)]:
        image = _image(w, h, seed=w + h)
        expected = stock(image, return_tensors="np")["pixel_values"]
        assert np.array_equal(processor(image)["pixel_values"].numpy(), expected)


def test_rescale_fast_path_is_exact_for_every_uint8_value():
    values = np.arange(256, dtype=np.float32)
    divisor = ipm._exact_rescale_divisor(1 / 255)
    assert divisor == 255.0
    assert np.array_equal(values / np.float32(divisor), values / 255.0)  # the oracle's arithmetic
    # An image holding every uint8 value in every channel, through the whole pipeline, in one 1x1 tile.
    ramp = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    ramp = np.concatenate([ramp, ramp[..., ::-1]], axis=0)  # 32 x 16
    tiny = MLLMSegImageProcessor(tile_size=16, tiling="single")
    image = Image.fromarray(ramp).resize((16, 16), Image.NEAREST)
    expected = oracle.normalize([image], image_size=16)
    assert np.array_equal(tiny(image)["pixel_values"].numpy(), expected)


def test_other_rescale_and_normalisation_settings():
    """Non-default settings follow transformers' arithmetic (float64 rescale, then float32 (x - mean) / std)."""
    image = _image(40, 40, seed=6)
    pixels = np.asarray(image).transpose(2, 0, 1)[None]  # 40 px tile: no resize
    plain = MLLMSegImageProcessor(tile_size=40, tiling="single", do_normalize=False)(image)["pixel_values"].numpy()
    assert np.array_equal(plain, pixels / np.float32(255))
    factor = 1 / 127.5
    custom = MLLMSegImageProcessor(tile_size=40, tiling="single", rescale_factor=factor, image_mean=0.5, image_std=0.5)
    expected = ((pixels.astype(np.float64) * factor).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(custom(image)["pixel_values"].numpy(), expected)


@pytest.mark.parametrize(
    "settings",
    [
        dict(tile_size=224, max_tiles=6),
        dict(tile_size=112, min_tiles=2, max_tiles=8),
        dict(tile_size=448, max_tiles=4, use_thumbnail=False),
    ],
)
def test_configurable_tile_size_and_bounds(settings):
    proc = MLLMSegImageProcessor(**settings)
    oracle_kwargs = dict(
        image_size=settings["tile_size"], min_num=settings.get("min_tiles", 1), max_num=settings["max_tiles"],
        use_thumbnail=settings.get("use_thumbnail", True),
    )
    for w, h in [(700, 100), (300, 300), (97, 301), (1000, 640), (5, 5)]:
        _assert_matches_oracle(proc, _image(w, h, seed=w * h), **oracle_kwargs)


# ------------------------------------------------------------------------------------------------ single mode


def _single_oracle(image, size=448):
    return oracle.normalize([image.convert("RGB").resize((size, size), Image.BICUBIC)], image_size=size)


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (2000, 40), (448, 448), (451, 300), (640, 480), (1024, 768)])
def test_single_mode_is_one_square_bicubic_resize(size):
    proc = MLLMSegImageProcessor(tiling="single")
    image = _image(*size, seed=size[0] + 3 * size[1])
    out = proc(image)
    assert out["tile_grids"].tolist() == [[1, 1]] and out["num_tiles"].tolist() == [1]
    assert np.array_equal(out["pixel_values"].numpy(), _single_oracle(image))


def test_single_mode_on_photos(photos):
    proc = MLLMSegImageProcessor(tiling="single")
    for image in photos.values():
        assert np.array_equal(proc(image)["pixel_values"].numpy(), _single_oracle(image))


def test_per_call_overrides(processor):
    image = _image(900, 300, seed=1)
    assert processor(image)["num_tiles"].tolist() == [4]  # 3x1 grid + thumbnail
    single = processor(image, tiling="single")
    assert single["num_tiles"].tolist() == [1] and np.array_equal(single["pixel_values"].numpy(), _single_oracle(image))
    capped = processor(image, max_tiles=2)
    assert capped["tile_grids"].tolist() == [[1, 2]] and capped["num_tiles"].tolist() == [3]
    assert processor.tiling == "dynamic" and processor.max_tiles == 12  # overrides do not stick
    with pytest.raises(ValueError, match="tiling"):
        processor(image, tiling="grid")
    with pytest.raises(ValueError, match="max_tiles"):
        processor(image, min_tiles=3, max_tiles=2)


# ------------------------------------------------------------------------------------------------ outputs and inputs


def test_batch_outputs_concatenate_in_order(processor, tmp_path):
    a, b, c = _image(900, 300, seed=2), _image(50, 50, seed=3), _image(300, 700, seed=4)
    path = tmp_path / "c.png"
    c.save(path)
    out = processor([a, np.asarray(b), str(path)])
    assert set(out.keys()) == {"pixel_values", "num_tiles", "tile_grids", "original_sizes"}
    assert out["pixel_values"].dtype == torch.float32
    for key in ("num_tiles", "tile_grids", "original_sizes"):
        assert out[key].dtype == torch.int64
    assert out["original_sizes"].tolist() == [[300, 900], [50, 50], [700, 300]]
    assert out["tile_grids"].shape == (3, 2)
    parts = out["pixel_values"].split(out["num_tiles"].tolist())
    for part, image in zip(parts, (a, b, c)):
        assert np.array_equal(part.numpy(), processor(image)["pixel_values"].numpy())
    as_numpy = processor([a, b], return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["num_tiles"].dtype == np.int64


def test_array_and_tensor_inputs_agree(processor):
    image = _image(120, 80, seed=5)
    hwc = np.asarray(image)
    reference = processor(image)["pixel_values"]
    assert torch.equal(processor(hwc)["pixel_values"], reference)
    assert torch.equal(processor(torch.from_numpy(hwc.copy()).permute(2, 0, 1))["pixel_values"], reference)  # CHW
    assert torch.equal(processor(hwc.astype(np.float32) / 255.0)["pixel_values"], reference)  # float in [0, 1]
    stacked = processor(np.stack([hwc, hwc]))  # [N, H, W, C] batch
    assert torch.equal(stacked["pixel_values"], torch.cat([reference, reference]))
    assert stacked["num_tiles"].tolist() == [7, 7]  # 3x2 grid + thumbnail each
    assert processor([[image], [hwc]])["num_tiles"].tolist() == [7, 7]  # nested lists are flattened in order
    gray = np.asarray(image.convert("L"))
    assert torch.equal(processor(gray)["pixel_values"], processor(image.convert("L"))["pixel_values"])


# ------------------------------------------------------------------------------------------------ RGB conversion


def test_grayscale_to_rgb():
    gray = np.array([[0, 17, 128, 255]], dtype=np.uint8)
    rgb = np.asarray(load_image(Image.fromarray(gray, mode="L")))
    assert rgb.shape == (1, 4, 3) and np.array_equal(rgb, np.repeat(gray[..., None], 3, axis=-1))


def test_rgba_composited_on_white():
    pixels = np.array([[[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 0, 128], [10, 20, 30, 0]]], dtype=np.uint8)
    rgb = np.asarray(load_image(Image.fromarray(pixels, mode="RGBA"))).astype(int)
    assert rgb[0, 0].tolist() == [255, 0, 0]  # opaque: unchanged
    assert rgb[0, 1].tolist() == [255, 255, 255]  # transparent: white, whatever colour it stores
    assert rgb[0, 3].tolist() == [255, 255, 255]
    assert np.all(np.abs(rgb[0, 2] - 127) <= 1)  # half-transparent black over white: mid grey
    la = np.array([[[40, 255], [40, 0]]], dtype=np.uint8)
    assert np.asarray(load_image(Image.fromarray(la, mode="LA"))).tolist() == [[[40, 40, 40], [255, 255, 255]]]


def test_palette_with_and_without_transparency():
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    image.putpalette(palette)
    assert np.asarray(load_image(image)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    image.info["transparency"] = 1  # index 1 transparent (GIF/PNG tRNS)
    assert np.asarray(load_image(image)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    buffer = io.BytesIO()  # and the same through a real PNG file
    image.save(buffer, format="PNG", transparency=1)
    assert np.asarray(load_image(buffer.getvalue())).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    expected = np.rint(values / 257.0).astype(np.uint8)  # [0, 1, 4, 128, 255]
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    assert np.asarray(image.convert("L")).tolist() == [[0, 255, 255, 255, 255]]  # what Pillow alone would do
    assert np.array_equal(np.asarray(load_image(image))[..., 0], expected)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(values.astype(np.int32))))[..., 0], expected)  # "I"
    big_endian = Image.frombytes("I;16B", image.size, values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(load_image(big_endian))[..., 0], expected)
    path = tmp_path / "depth16.png"  # a real 16-bit PNG file
    image.save(path)
    assert np.array_equal(np.asarray(load_image(path))[..., 0], expected)
    assert np.array_equal(np.asarray(load_image(values))[..., 0], expected)  # uint16 arrays too


def test_cmyk_to_rgb():
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (100, 50, 0, 30)]
    image = Image.new("CMYK", (4, 1))
    image.putdata(cmyk)
    rgb = np.asarray(load_image(image)).astype(int)[0]
    for (c, m, y, k), got in zip(cmyk, rgb):
        expected = [(255 - v) * (255 - k) / 255 for v in (c, m, y)]
        assert np.all(np.abs(got - expected) <= 1), (c, m, y, k, got)
    assert rgb[0].tolist() == [255, 255, 255] and rgb[1].tolist() == [0, 255, 255] and rgb[2].tolist() == [0, 0, 0]


def test_rgb_is_returned_without_copy():
    image = _image(10, 10, seed=0)
    assert load_image(image) is image


# ------------------------------------------------------------------------------------------------ errors


def test_corrupt_file_names_the_file(tmp_path, processor):
    bad = tmp_path / "broken_image.jpg"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageLoadError, match="broken_image.jpg") as info:
        load_image(bad)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    with pytest.raises(ImageLoadError, match="broken_image.jpg"):
        processor(str(bad))


def test_truncated_file_names_the_file(tmp_path):
    buffer = io.BytesIO()
    _image(200, 200, seed=9, smooth=False).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(truncated)


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "no_such_image.png"
    with pytest.raises(FileNotFoundError, match="no_such_image.png"):
        load_image(missing)
    with pytest.raises(FileNotFoundError, match="no_such_image.png"):
        MLLMSegImageProcessor()(str(missing))


@pytest.mark.parametrize("size", [(15, 10), (20, 20)], ids=["over-limit-warning", "over-2x-limit-error"])
def test_decompression_bomb_names_file_and_limit(tmp_path, monkeypatch, size):
    path = tmp_path / "huge_scan.png"
    Image.new("RGB", size).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 150 px: Pillow only warns; 400 px: Pillow raises
    with pytest.raises(ImageTooLargeError, match="huge_scan.png") as info:
        load_image(path)
    assert "MAX_IMAGE_PIXELS=100" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert load_image(path).size == size


def test_bad_inputs_raise_clear_errors(processor):
    with pytest.raises(TypeError, match="Unsupported image type"):
        load_image(12345)
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.5, dtype=np.float32))
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((6, 6, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="No images"):
        processor([])
    with pytest.raises(ValueError, match="tiling"):
        MLLMSegImageProcessor(tiling="tiles")


# ------------------------------------------------------------------------------------------------ save / load


def test_save_and_load_keep_settings(tmp_path):
    proc = MLLMSegImageProcessor(tiling="single", tile_size=224, min_tiles=2, max_tiles=6, use_thumbnail=False)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MLLMSegImageProcessor"
    assert saved["tiling"] == "single" and saved["size"] == {"height": 224, "width": 224}
    assert (saved["min_tiles"], saved["max_tiles"], saved["use_thumbnail"]) == (2, 6, False)

    loaded = MLLMSegImageProcessor.from_pretrained(tmp_path)
    assert (loaded.tiling, loaded.tile_size, loaded.min_tiles, loaded.max_tiles, loaded.use_thumbnail) == (
        "single", 224, 2, 6, False
    )
    assert tuple(loaded.image_mean) == tuple(proc.image_mean) and int(loaded.resample) == int(proc.resample)
    image = _image(300, 200, seed=11)
    assert torch.equal(loaded(image)["pixel_values"], proc(image)["pixel_values"])
    assert torch.equal(loaded(image, tiling="dynamic")["pixel_values"], proc(image, tiling="dynamic")["pixel_values"])


def test_saved_folder_loads_with_auto_class_and_standalone_file(tmp_path):
    """The saved folder loads through AutoImageProcessor, and the copied remote file works on its own."""
    from transformers import AutoImageProcessor

    proc = MLLMSegImageProcessor(tiling="single", tile_size=112)
    proc.save_pretrained(tmp_path)
    image = _image(64, 48, seed=12)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "MLLMSegImageProcessor" and (loaded.tiling, loaded.tile_size) == ("single", 112)
    assert torch.equal(loaded(image)["pixel_values"], proc(image)["pixel_values"])

    remote_file = tmp_path / "image_processing_mllmseg.py"  # copied when the class is registered (mllmseg/__init__)
    assert remote_file.exists(), "importing mllmseg registers the class, so save_pretrained copies its file"
    spec = importlib.util.spec_from_file_location("standalone_image_processing_mllmseg", remote_file)
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)  # no package around it: fails if the file imports anything of mllmseg
    reloaded = standalone.MLLMSegImageProcessor.from_pretrained(tmp_path)
    assert torch.equal(reloaded(image)["pixel_values"], proc(image)["pixel_values"])


def test_remote_file_imports_only_allowed_modules():
    source = (REPO_ROOT / "mllmseg" / "remote_code" / "image_processing_mllmseg.py").read_text()
    # httpx fetches image URLs, as transformers' own `load_image` does (a dependency of transformers 5 through
    # huggingface_hub, so every environment that runs the checkpoint has it).
    allowed = {"torch", "numpy", "PIL", "transformers", "__future__", "io", "os", "warnings", "collections",
               "functools", "typing", "httpx"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1), "only flat relative imports may travel with a checkpoint"
            roots = {node.module.split(".")[0]} if node.level == 0 else set()
        else:
            continue
        assert roots <= allowed, roots
        assert "torchvision" not in roots and "mllmseg" not in roots


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (7, 0)])
def test_an_empty_image_is_refused_naming_its_size(processor, size):
    """A 0xN PIL image used to reach torch's interpolation ("Input and output sizes should be greater than 0")."""
    with pytest.raises(ImageLoadError, match=f"empty: {size[0]}x{size[1]} pixels"):
        load_image(Image.new("RGB", size))
    with pytest.raises(ImageLoadError, match=rf"images\[1\]: Image is empty: {size[0]}x{size[1]}"):
        processor([Image.new("RGB", (8, 8)), Image.new("L", size)])


def test_bad_items_of_a_batch_are_named_by_index_and_value(processor):
    good = Image.new("RGB", (8, 8))
    with pytest.raises(TypeError, match=r"images\[1\]: Unsupported image type NoneType"):
        processor([good, None])
    with pytest.raises(TypeError, match=r"images\[2\]: Unsupported image type dict"):
        processor([good, good, {"path": "x.png"}])
    nan = np.full((4, 4, 3), 0.5, dtype=np.float32)
    nan[1, 2, 0] = np.nan
    with pytest.raises(ImageLoadError, match=r"images\[1\]: .*1 non-finite values .*nan at index \(1, 2, 0\)"):
        processor([good, nan])
    with pytest.raises(ImageLoadError, match="non-finite"):  # tensors alike, and a single image has no index
        processor(torch.full((3, 4, 4), float("inf")))
    with pytest.raises(FileNotFoundError, match=r"images\[1\]: .*missing.png"):
        processor([good, "missing.png"])


def test_max_pixels_is_checked_on_the_header_before_decoding(tmp_path):
    """A PNG whose header claims 4000 x 4000 but whose pixel data is cut off: refused as too large (so nothing
    was decoded: decoding would have failed as truncated), while without the limit it is a truncated file."""
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")
    path = tmp_path / "claims_16mp.png"
    path.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageTooLargeError, match=r"claims_16mp.png.* 4000x4000 = 16000000 pixels, over the limit of "
                       r"1000000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match="Image bytes is 4000x4000"):
        load_image(buffer.getvalue()[:200], max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="claims_16mp.png") as info:
        load_image(path)
    assert not isinstance(info.value, ImageTooLargeError)
    with pytest.raises(ImageTooLargeError, match="over the limit of 15"):  # decoded inputs are checked too
        load_image(Image.new("RGB", (4, 4)), max_pixels=15)
    assert load_image(Image.new("RGB", (4, 4)), max_pixels=16).size == (4, 4)
