"""Spot-centred crops from plain images (HER2ST JPEGs, Visium PNGs): decode once, resample boxes.

Spot tables are small images or single JPEGs that cannot be read piecewise, so the whole image
is decoded once (cached) and each tile is a box resampled to the requested size by the one
resampler that also cuts inference tiles from slides (`mupd.io.resample`); boxes that run past
the image edge are filled black, like the masked background of the HER2ST A1 image.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError
from ..io.resample import array_reader, resample_window

Box = tuple[int, int, int, int]


@functools.lru_cache(maxsize=2)
def load_rgb(path: str, masked: Optional[tuple[Box, ...]] = None) -> np.ndarray:
    """The image as a read-only (H, W, 3) uint8 array with `masked` (x0, y0, x1, y1) boxes set to
    black (non-tissue to hide)."""
    Image.MAX_IMAGE_PIXELS = None  # HER2ST full-resolution JPEGs are ~92 Mpx
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    for x0, y0, x1, y1 in masked or ():
        array[y0:y1, x0:x1] = 0
    array.flags.writeable = False
    return array


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, without decoding (and without PIL's bomb warning)."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def centred_tiles(image: np.ndarray, centres: np.ndarray, tile_size: int,
                  scale: float) -> np.ndarray:
    """(N, T, T, 3) uint8 tiles of `tile_size * scale` image pixels around each (x, y) centre."""
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    read = array_reader(image, fill=0)  # black past the edges
    half = tile_size * scale / 2
    out = np.empty((len(centres), tile_size, tile_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(centres):
        out[i] = resample_window(read, x - half, y - half, tile_size, tile_size, scale, scale)
    return out


def crop_spots(path: Path, centres: np.ndarray, tile_size: int, image_mpp: float, mpp: float,
               masked: Sequence[Box] = ()) -> np.ndarray:
    """Tiles of `tile_size` px at `mpp` um/px centred on image-pixel `centres`."""
    if tile_size < 1 or mpp <= 0:
        raise DataError(f"tile size {tile_size} px and mpp {mpp} must be positive")
    image = load_rgb(str(path), tuple(tuple(int(v) for v in b) for b in masked) or None)
    return centred_tiles(image, centres, tile_size, mpp / image_mpp)
