"""The starting noise of sampling, drawn on the CPU from a seed: the same images on every device
and batch size; with tile positions, windows of one position-keyed field, so that tiles that
overlap start from the same noise where they overlap (no seams from the noise)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .errors import ConditionError


def tile_noise(n: int, seed: int, channels: int, size: int, step: int,
               positions: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
    """(n, channels, size, size) standard-normal latents.

    With `positions` (each tile's (y, x) origin in image pixels of one shared frame, multiples
    of `step`, the image pixels per latent pixel) the noise of a tile is its window of one noise
    field over that frame; the field is drawn in tile-sized blocks keyed by (seed, block row,
    block column), so any tile is cut out without the whole field.
    """
    if positions is None:
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, channels, size, size), generator=gen)
    if len(positions) != n:
        raise ConditionError(f"{len(positions)} tile positions given for {n} tiles")
    if seed < 0:
        raise ConditionError(f"seed must be >= 0 for positioned tiles (got {seed})")
    tiles = []
    for y, x in positions:
        if y % step or x % step or y < 0 or x < 0:
            raise ConditionError(f"tile position ({y}, {x}) px is not a non-negative multiple of "
                                 f"the model's latent step {step} px")
        tiles.append(_field_window(int(seed), y // step, x // step, size, channels))
    return torch.from_numpy(np.stack(tiles))


def _field_window(seed: int, y: int, x: int, size: int, channels: int) -> np.ndarray:
    """The (channels, size, size) window at latent (y, x) of a standard-normal field made of
    size x size blocks, block (by, bx) drawn from the seed sequence (seed, by, bx)."""
    out = np.empty((channels, size, size), dtype=np.float32)
    for by in range(y // size, (y + size - 1) // size + 1):
        for bx in range(x // size, (x + size - 1) // size + 1):
            block = np.random.default_rng([seed, by, bx]).standard_normal(
                (channels, size, size), dtype=np.float32)
            ya, xa = max(y, by * size), max(x, bx * size)
            yb, xb = min(y + size, (by + 1) * size), min(x + size, (bx + 1) * size)
            out[:, ya - y : yb - y, xa - x : xb - x] = block[:, ya - by * size : yb - by * size,
                                                             xa - bx * size : xb - bx * size]
    return out
