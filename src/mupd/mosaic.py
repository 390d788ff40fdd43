"""Generated tiles laid out as one image: `mupd generate`'s mosaic.png and the Generate panel's grid."""

from __future__ import annotations

import math

import numpy as np


def mosaic(images: np.ndarray, columns: int | None = None, gap: int = 0) -> np.ndarray:
    """Tiles side by side in a near-square grid, white where the grid is not full and in the gaps."""
    n, h, w = images.shape[:3]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap) + images.shape[3:],
                   255, dtype=images.dtype)
    for i, tile in enumerate(images):
        r, c = divmod(i, columns)
        y, x = r * (h + gap), c * (w + gap)
        grid[y : y + h, x : x + w] = tile
    return grid
