"""Test oracle: InternVL-style dynamic tiling exactly as the InternVL2.5 / MLLMSeg model card describes it
(`find_closest_aspect_ratio` + `dynamic_preprocess` + the card's transform), written plainly with PIL and NumPy so
that the image processor's vectorised version can be checked against it. Not used by the package.

    tiles = dynamic_tiles(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True)
    array = normalize(tiles)          # float32 (n, 3, image_size, image_size)
"""
import numpy as np
from PIL import Image

MEAN = np.array((0.485, 0.456, 0.406), np.float32)  # ImageNet, as the card's transform
STD = np.array((0.229, 0.224, 0.225), np.float32)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(columns, rows) with min_num <= columns * rows <= max_num, by tile count. The card sorts a *set* by area, so
    grids of equal area keep the set's iteration order; building the same set keeps that order."""
    grids = {(c, r) for n in range(min_num, max_num + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_num <= c * r <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def grid_for(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448):
    """The card's choice: the grid whose aspect ratio is closest to the image's; on an exact tie a later (larger)
    grid wins when the image has more than half the pixels that grid would hold."""
    aspect = width / height
    chosen, chosen_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < chosen_diff:
            chosen, chosen_diff = (cols, rows), diff
        elif diff == chosen_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            chosen = (cols, rows)
    return chosen


def dynamic_tiles(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    """PIL tiles of the resized image in row-major order, then the thumbnail when there are several."""
    image = image.convert("RGB")
    cols, rows = grid_for(*image.size, min_num, max_num, image_size)
    canvas = image.resize((cols * image_size, rows * image_size))  # PIL's default filter, as the card
    tiles = [
        canvas.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def normalize(tiles, image_size=448):
    """The card's transform: RGB, bicubic resize to the tile size, [0, 1], ImageNet mean / std; (n, 3, S, S)."""
    arrays = []
    for tile in tiles:
        pixels = np.asarray(tile.convert("RGB").resize((image_size, image_size), Image.BICUBIC), np.float32) / 255.0
        arrays.append(((pixels - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(arrays)
