"""Seam-free blending of overlapping tiles into bounded memory.

Tiles overlap and are blended with a feathered window whose weights are normalised, so the
result has no seams. A marker map is blended in two parts: its tile level (the mean over the
central spot footprint, the one value per tile a spot-trained model learns) is interpolated
between tile centres with tent windows that reach the neighbouring centres (`level_window`),
and only the rest, the map less that level, is feathered. Feathering alone would move a level
that differs between tiles across the 32 px overlap band, which draws the tile grid as blocks.
The weighted sums are fixed-point integers, so they are bit-identical however the tiles are
split across processes or ordered (`mupd.distributed`), and for large regions they live in zarr
arrays on disk so that a whole section never sits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # floored per axis, not as a product: a floor on the product would flatten the ramps along
    # the region's edges (where weights are small on one axis) into hard tile borders there
    ramp = np.maximum(ramp, 1e-3)
    return np.outer(ramp, ramp)


def level_window(tile: int, stride: int) -> tuple[int, np.ndarray]:
    """(margin, weights): a 2-D tent centred on the tile, falling to 0 at the neighbouring tile
    centres `stride` px away, so that tile levels blend into their bilinear interpolation between
    centres (tents a stride apart sum to 1). The window reaches `margin` px past each tile edge.
    Hard tiling (`stride == tile`, no overlap) keeps one flat level per tile."""
    if stride >= tile:
        return 0, np.ones((tile, tile), dtype=np.float32)
    ramp = 1.0 - np.abs(np.arange(2 * stride, dtype=np.float32) + 0.5 - stride) / stride
    return stride - tile // 2, np.outer(ramp, ramp)  # > 0 everywhere: 0.5 / stride at the ends


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
        for y, x, value in tiles:  # a level window may also start before the output
            value = value[max(0, -y) : height - y, max(0, -x) : width - x]
            y, x = max(0, y), max(0, x)
            rows.setdefault(y, []).append((y, x, value))
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
    #: Per marker output, its tile levels under `level_window`, and those windows' weights.
    levels: dict[str, Accumulator] = field(default_factory=dict)
    level_weight: Optional[Accumulator] = None

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
        levels = {name: make(f"_level-{name}") for name, rgb in outputs.items() if not rgb}
        return cls(acc, make("_weight"), tmp, on_disk,
                   source=make("_source", (3,)) if keep_source else None,
                   levels=levels, level_weight=make("_level-weight") if levels else None)

    def arrays(self) -> list[Any]:
        """Every sum array in a fixed order (for reducing across processes)."""
        extra = [self.source.sum] if self.source is not None else []
        levels = [self.levels[k].sum for k in sorted(self.levels)]
        levels += [self.level_weight.sum] if self.level_weight is not None else []
        return [self.outputs[k].sum for k in sorted(self.outputs)] + [self.weight.sum] + extra + levels

    def _sums_of(self, name: str) -> list[Any]:
        arrays = [self.outputs[name].sum, self.weight.sum]
        if name in self.levels:
            arrays += [self.levels[name].sum, self.level_weight.sum]
        return arrays

    def blended(self, name: str, lazy: bool = False) -> Any:
        """Output `name` normalised (`normalised`): numpy, or dask over the zarr sums (`lazy`)."""
        arrays = self._sums_of(name)
        if lazy:
            import dask.array as da

            arrays = [da.from_zarr(a) for a in arrays]
        return normalised(*arrays)

    def window(self, name: str) -> "Normalised":
        """Output `name` normalised slice by slice (sums in memory or on disk)."""
        return Normalised(*self._sums_of(name))


def normalised(total: Any, weight: Any, level: Any = None, level_weight: Any = None) -> Any:
    """The blended value of a sum over the weights (numpy or dask; the fixed-point scales
    cancel): RGB sums give uint8, marker sums float32 in [0, 1]; a marker's interpolated tile
    level (`level` over `level_weight`) is added back to its feathered rest."""
    if total.ndim == 3:
        return (total / weight[..., None]).clip(0, 255).round().astype(np.uint8)
    value = total / weight
    if level is not None:
        value = value + level / level_weight
    return value.clip(0, 1).astype(np.float32)


class Normalised:
    """`normalised` of sums (numpy or zarr) read slice by slice, for large regions."""

    def __init__(self, *sums: Any) -> None:
        self.sums = sums
        self.shape = tuple(sums[0].shape)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        return normalised(*(np.asarray(s[index]) for s in self.sums))
