"""Shared helpers for the writers: input checks and a 2x mean-reduced dask pyramid."""

from __future__ import annotations

from typing import Optional, Sequence

import dask.array as da
import numpy as np

from ..errors import MuPDError
from .slide import as_mpp_pair

#: Levels stop halving once the longer side fits in this many pixels.
MIN_LEVEL_SIZE = 512
TILE = 512


def as_yxc(image, what: str) -> da.Array:
    """A (Y, X, C) dask array from numpy/dask input, or a clear error about its shape."""
    arr = image if isinstance(image, da.Array) else da.from_array(np.asarray(image), chunks=(TILE, TILE, -1))
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise MuPDError(f"image for {what} must be (Y, X, C) with positive sizes, got shape {arr.shape}")
    if arr.dtype.kind not in "uif" and arr.dtype != bool:
        raise MuPDError(f"image for {what} has unsupported dtype {arr.dtype}")
    return arr


def check_channels(names: Optional[Sequence[str]], colors: Optional[Sequence[str]], n: int,
                   what: str) -> tuple[list[str], list[Optional[str]]]:
    """Channel names (default R,G,B or 'channel i') and 6-digit hex colours, one per channel."""
    if names is None:
        names = ["R", "G", "B"] if n == 3 else [f"channel {i}" for i in range(n)]
    names = [str(v) for v in names]
    if len(names) != n:
        raise MuPDError(f"{what}: {len(names)} channel names {names} for an image with {n} channels")
    if colors is None:
        colors = ["FF0000", "00FF00", "0000FF"] if names == ["R", "G", "B"] else [None] * n
    colors = [None if c is None else str(c).lstrip("#").upper() for c in colors]
    if len(colors) != n:
        raise MuPDError(f"{what}: {len(colors)} colours for an image with {n} channels")
    for c in colors:
        if c is not None and (len(c) != 6 or any(ch not in "0123456789ABCDEF" for ch in c)):
            raise MuPDError(f"{what}: channel colour {c!r} is not a hex RGB like 'FF00FF'")
    return names, colors


def check_mpp(mpp, what: str) -> tuple[float, float]:
    pair = as_mpp_pair(mpp, what)
    if pair is None:
        raise MuPDError(f"{what}: an mpp (micrometres per pixel) is required to write a calibrated image")
    return pair


def build_pyramid(image: da.Array, n_levels: Optional[int]) -> list[da.Array]:
    """Level 0 and its 2x mean reductions: level i pixels are 2**i blocks (odd edge trimmed).

    `n_levels` None: halve until the longer side is <= MIN_LEVEL_SIZE."""
    if n_levels is not None and int(n_levels) < 1:
        raise MuPDError(f"n_levels must be >= 1, got {n_levels}")
    levels = [image]
    while True:
        prev = levels[-1]
        if n_levels is not None and len(levels) >= int(n_levels):
            break
        if n_levels is None and max(prev.shape[:2]) <= MIN_LEVEL_SIZE:
            break
        if min(prev.shape[:2]) < 2:
            break
        nxt = da.coarsen(np.mean, prev.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
        if np.issubdtype(image.dtype, np.integer):
            nxt = da.round(nxt)
        levels.append(nxt.astype(image.dtype).rechunk((TILE, TILE, -1)))
    return levels


def write_pyramid_atomically(kind: str, path, image, mpp, channel_names, colors, overwrite: bool,
                             n_levels, metadata, write) -> Path:
    """The checks, pyramid and atomic rename both writers share; `write(tmp, levels, mpp,
    names, colours, metadata, final_name)` writes one format."""
    from pathlib import Path

    from .atomic import atomic_output

    final = Path(path)
    what = f"{kind} {final}"
    arr = as_yxc(image, what)
    pair = check_mpp(mpp, what)
    names, cols = check_channels(channel_names, colors, int(arr.shape[2]), what)
    levels = build_pyramid(arr, n_levels)
    with atomic_output(final, overwrite) as tmp:
        write(tmp, levels, pair, names, cols, metadata, final.name)
    return final
