"""Tile grids over a slide at a target mpp, keeping only tissue.

A grid is a table of level-0 boxes (x, y, w, h) whose content, read at `mpp`, is a
`tile_size` x `tile_size` tile; neighbours overlap by `overlap` tile pixels. Boxes are chosen
from a low-resolution tissue mask first (cheap), and `read_tiles` re-checks each tile at full
detail with `is_tissue` (pen ink and glass that the thumbnail cannot separate are dropped there).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import pandas as pd
from skimage.transform import resize

from ..errors import DataError
from .tissue import MIN_TISSUE_FRACTION, TissueMask, is_tissue, slide_tissue_mask

MaskArg = Union[TissueMask, str, None]


def tile_grid(slide, mpp: float, tile_size: int, overlap: int = 0, mask: MaskArg = "auto",
              min_fraction: float = MIN_TISSUE_FRACTION) -> pd.DataFrame:
    """Level-0 boxes of tiles with at least `min_fraction` tissue in `mask`.

    `mask="auto"` computes `slide_tissue_mask(slide)`; `None` keeps every tile. Columns:
    x, y, w, h (level-0 px), mpp, tile_size, tissue_fraction (NaN without a mask).
    """
    if tile_size < 1 or not 0 <= overlap < tile_size:
        raise DataError(f"tile size {tile_size} px must be positive and overlap {overlap} px in "
                        f"[0, tile size)")
    if not (np.isfinite(mpp) and mpp > 0):
        raise DataError(f"target mpp must be a positive number of um/px, got {mpp}")
    if slide.mpp is None:
        raise DataError(f"slide {slide.path} has no mpp; open it with open_slide(path, mpp=...) "
                        f"to tile it at {mpp} um/px")
    if isinstance(mask, str):
        if mask != "auto":
            raise DataError(f"mask must be 'auto', None or a TissueMask, got {mask!r}")
        mask = slide_tissue_mask(slide)
    width, height = slide.dimensions
    size = [tile_size * mpp / m for m in slide.mpp]
    stride = [(tile_size - overlap) * mpp / m for m in slide.mpp]
    w, h = round(size[0]), round(size[1])
    if w > width or h > height:
        raise DataError(f"a {tile_size}-px tile at {mpp} um/px ({w}x{h} level-0 px) is larger than "
                        f"slide {slide.path} ({width}x{height})")
    xs = np.round(np.arange(0, width - size[0] + 1e-6, stride[0])).astype(int)
    ys = np.round(np.arange(0, height - size[1] + 1e-6, stride[1])).astype(int)
    xs, ys = xs[xs + w <= width], ys[ys + h <= height]
    gx, gy = np.meshgrid(xs, ys)
    grid = pd.DataFrame({"x": gx.ravel(), "y": gy.ravel(), "w": w, "h": h, "mpp": float(mpp),
                         "tile_size": int(tile_size)})
    if mask is None:
        grid["tissue_fraction"] = np.nan
        return grid
    grid["tissue_fraction"] = [mask.fraction(x, y, w, h) for x, y in zip(grid.x, grid.y)]
    return grid[grid.tissue_fraction >= min_fraction].reset_index(drop=True)


def read_tile(slide, x: int, y: int, w: int, h: int, mpp: float, tile_size: int) -> np.ndarray:
    """The (T, T, 3) uint8 tile of a grid box, read from the best pyramid level."""
    tile = np.asarray(slide.read_region((int(x), int(y)), (int(w), int(h)), mpp=mpp))[..., :3]
    if tile.shape[:2] != (tile_size, tile_size):  # level-0 rounding: at most a pixel off
        tile = (resize(tile, (tile_size, tile_size), preserve_range=True, anti_aliasing=False)
                .round().astype(np.uint8))
    return tile


def read_tiles(slide, grid: pd.DataFrame, check_tissue: bool = True,
               limit: Optional[int] = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Tiles of a grid (the first `limit` that pass), dropping those `is_tissue` rejects."""
    rows, tiles = [], []
    for i, r in enumerate(grid.itertuples(index=False)):
        tile = read_tile(slide, r.x, r.y, r.w, r.h, r.mpp, r.tile_size)
        if check_tissue and not is_tissue(tile):
            continue
        rows.append(i)
        tiles.append(tile)
        if limit is not None and len(tiles) >= limit:
            break
    size = int(grid.tile_size.iloc[0]) if len(grid) else 0
    stack = np.stack(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)
    return grid.iloc[rows].reset_index(drop=True), stack
