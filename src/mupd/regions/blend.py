"""Seam-free blending of overlapping tiles into bounded memory.

Tiles overlap and are blended with a feathered window whose weights are normalised, so the
result has no seams. The weighted sums are fixed-point integers, so they are bit-identical
however the tiles are split across processes or ordered (`mupd.distributed`), and for large
regions they live in zarr arrays on disk so that a whole section never sits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

#: Regions with more output pixels than this accumulate on disk instead of in memory.
IN_MEMORY_LIMIT_PX = 4096 * 4096
#: Fixed-point scale of the blending sums. Integer addition is associative, so the sums (and
#: the output) are bit-identical however the tiles are split across processes or ordered.
FIXED_POINT = float(2**32)


def feather_window(tile: int, overlap: int) -> np.ndarray:
    """2-D blending weights: 1 inside, a raised-cosine ramp across the overlap margins."""
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
        ramp[:overlap] = edge
        ramp[tile - overlap :] = edge[::-1]
    return np.maximum(np.outer(ramp, ramp), 1e-3)


class Accumulator:
    """Weighted fixed-point sums for one output (numpy in memory, zarr on disk when large)."""

    def __init__(self, shape: tuple[int, ...], store: Optional[Path], chunk: int) -> None:
        if store is None:
            self.sum = np.zeros(shape, dtype=np.int64)
        else:
            import zarr

            # uncompressed: every tile is a read-modify-write of the chunks under it
            chunks = (chunk, chunk) + tuple(shape[2:])
            self.sum = zarr.create_array(store, shape=shape, chunks=chunks, dtype="i8",
                                         compressors=None, fill_value=0)

    def add(self, tiles: Sequence[tuple[int, int, np.ndarray]]) -> None:
        """Add (y, x, value) tiles, cut to the part inside the output (the last tiles may reach
        past it); tiles of one grid row share one read-modify-write of the sums (on disk, a
        write per tile would rewrite every chunk under it several times)."""
        height, width = self.sum.shape[:2]
        rows: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        for y, x, value in tiles:
            rows.setdefault(y, []).append((y, x, value[: height - y, : width - x]))
        for row in rows.values():
            ya = min(y for y, _, _ in row)
            yb = max(y + v.shape[0] for y, _, v in row)
            xa = min(x for _, x, _ in row)
            xb = max(x + v.shape[1] for _, x, v in row)
            patch = np.zeros((yb - ya, xb - xa) + row[0][2].shape[2:], dtype=np.int64)
            for y, x, v in row:  # integer sums: exact whatever the grouping
                patch[y - ya : y - ya + v.shape[0], x - xa : x - xa + v.shape[1]] += np.rint(
                    v.astype(np.float64) * FIXED_POINT).astype(np.int64)
            sl = (slice(ya, yb), slice(xa, xb))
            self.sum[sl] = self.sum[sl] + patch


@dataclass
class RegionSums:
    """The partial blending sums of one process: one accumulator per output, plus the weights."""

    outputs: dict[str, Accumulator]
    weight: Accumulator
    workdir: Path
    on_disk: bool
    n_skipped: int = 0
    #: The blended source H&E, kept when marker maps are to be rendered as IHC: the rendering
    #: segments cells, so it runs once on the blended region, not per (overlapping) tile.
    source: Optional[Accumulator] = None

    @classmethod
    def create(cls, shape: tuple[int, int], outputs: dict[str, bool], keep_source: bool,
               chunk: int, workdir: Optional[Path] = None) -> "RegionSums":
        """Zeroed sums over an output of `shape`: one per name of `outputs` (True: RGB), and the
        source's when `keep_source`; on disk (zarr, `chunk`-px chunks, in a fresh folder under
        `workdir`) above IN_MEMORY_LIMIT_PX."""
        from ..io.atomic import owned_tempdir

        tmp = owned_tempdir("mupd-acc-", workdir)  # also removes those of killed runs
        on_disk = shape[0] * shape[1] > IN_MEMORY_LIMIT_PX

        def make(name: str, extra: tuple[int, ...] = ()) -> Accumulator:
            return Accumulator(shape + extra, tmp / f"{name}.zarr" if on_disk else None, chunk)

        acc = {name: make(name, (3,) if rgb else ()) for name, rgb in outputs.items()}
        return cls(acc, make("_weight"), tmp, on_disk,
                   source=make("_source", (3,)) if keep_source else None)

    def arrays(self) -> list[Any]:
        """Every sum array in a fixed order (for reducing across processes)."""
        extra = [self.source.sum] if self.source is not None else []
        return [self.outputs[k].sum for k in sorted(self.outputs)] + [self.weight.sum] + extra


def normalised(total: Any, weight: Any) -> Any:
    """The blended value of a sum over the weights (numpy or dask; the fixed-point scales
    cancel): RGB sums give uint8, marker sums float32 in [0, 1]."""
    if total.ndim == 3:
        return (total / weight[..., None]).clip(0, 255).round().astype(np.uint8)
    return (total / weight).clip(0, 1).astype(np.float32)


class Normalised:
    """`normalised` of a sum (numpy or zarr) read slice by slice, for large regions."""

    def __init__(self, total: Any, weight: Any) -> None:
        self.total, self.weight = total, weight
        self.shape = tuple(total.shape)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        return normalised(np.asarray(self.total[index]), np.asarray(self.weight[index]))
