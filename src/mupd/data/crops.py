"""Spot-centred crops from plain images (HER2ST JPEGs, Visium PNGs): decode once, resample boxes.

Spot tables are small images or single JPEGs that cannot be read piecewise, so the whole image
is decoded once (cached) and each tile is a box resampled to the requested size; boxes that run
past the image edge are filled black, like the masked background of the HER2ST A1 image.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError

Box = tuple[int, int, int, int]


@functools.lru_cache(maxsize=2)
def load_rgb(path: str, masked: Optional[tuple[Box, ...]] = None) -> Image.Image:
    """The image as RGB with `masked` (x0, y0, x1, y1) boxes set to black (non-tissue to hide)."""
    Image.MAX_IMAGE_PIXELS = None  # HER2ST full-resolution JPEGs are ~92 Mpx
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if masked:
        array = np.asarray(image).copy()
        for x0, y0, x1, y1 in masked:
            array[y0:y1, x0:x1] = 0
        image = Image.fromarray(array)
    return image


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, without decoding (and without PIL's bomb warning)."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def centred_tiles(image: Image.Image, centres: np.ndarray, tile_size: int, scale: float) -> np.ndarray:
    """(N, T, T, 3) uint8 tiles of `tile_size * scale` image pixels around each (x, y) centre."""
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    half = tile_size * scale / 2
    out = np.empty((len(centres), tile_size, tile_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(centres):
        x0, y0 = int(np.floor(x - half)), int(np.floor(y - half))
        x1, y1 = int(np.ceil(x + half)), int(np.ceil(y + half))
        window = image.crop((x0, y0, x1, y1))  # black past the edges
        box = (x - half - x0, y - half - y0, x + half - x0, y + half - y0)
        out[i] = np.asarray(window.resize((tile_size, tile_size), Image.BILINEAR, box=box))
    return out


def crop_spots(path: Path, centres: np.ndarray, tile_size: int, image_mpp: float, mpp: float,
               masked: Sequence[Box] = ()) -> np.ndarray:
    """Tiles of `tile_size` px at `mpp` um/px centred on image-pixel `centres`."""
    if tile_size < 1 or mpp <= 0:
        raise DataError(f"tile size {tile_size} px and mpp {mpp} must be positive")
    image = load_rgb(str(path), tuple(tuple(int(v) for v in b) for b in masked) or None)
    return centred_tiles(image, centres, tile_size, mpp / image_mpp)
