"""The one Slide object every reader returns: a lazy (Y, X, C) pyramid plus what it means in um.

Readers (TIFF family, plain images, OME-Zarr) only differ in how they find levels and metadata;
region reads, resampling to a target mpp, thumbnails and the mpp policy live here once.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import dask.array as da
import numpy as np
from ..errors import MuPDError, RegionError, SlideError
from .resample import array_reader, resample_window

#: Reads level pixels [y0:y1, x0:x1] as a (h, w, C) numpy array.
LevelReader = Callable[[int, int, int, int], np.ndarray]
MppLike = Union[float, tuple[float, float], None]

#: Most chunks (file tiles / strips) one pyramid level may have: its dask graph costs ~150 bytes a
#: chunk. A 200000 px square slide in 256 px tiles has 0.6 M; a forged 1 kB TIFF, 156 M (22 GB).
MAX_LEVEL_CHUNKS = 2**22
#: A file may declare a level of more values (pixels x channels) than this only if its
#: uncompressed size is less than MAX_EXPANSION times the file's bytes on disk.
MAX_LEVEL_VALUES = 2**33
#: Far beyond what JPEG / LZW / deflate tiles of real tissue reach (~10-100x): a forged header.
MAX_EXPANSION = 10_000


def check_level_size(path: Path, level: int, shape: Sequence[int], chunks: Sequence[int],
                     dtype: np.dtype, file_bytes: Optional[int] = None) -> None:
    """Refuse a level whose declared size is absurd, from its header alone, before any dask graph
    or buffer is made for it (a crafted header otherwise takes the host's memory).

    Refused: more than MAX_LEVEL_CHUNKS chunks; or, when `file_bytes` (the file's size) is given,
    more than MAX_LEVEL_VALUES values that uncompressed would be over MAX_EXPANSION times the file.
    """
    n_chunks = math.prod(-(-int(n) // max(1, int(c))) for n, c in zip(shape, chunks))
    values = math.prod(int(n) for n in shape)
    raw = values * np.dtype(dtype).itemsize
    declared = f"{path}: level {level} declares {' x '.join(str(int(n)) for n in shape)} {np.dtype(dtype)}"
    if n_chunks > MAX_LEVEL_CHUNKS:
        raise SlideError(f"{declared} in {n_chunks} chunks of {' x '.join(str(int(c)) for c in chunks)}, "
                         f"more than the {MAX_LEVEL_CHUNKS} a level may have; the file is corrupt or forged")
    if file_bytes is not None and values > MAX_LEVEL_VALUES and raw > MAX_EXPANSION * file_bytes:
        raise SlideError(f"{declared}, {raw} bytes uncompressed: {raw // max(1, file_bytes)} times the "
                         f"file's {file_bytes} bytes, which no real compression reaches; the file is "
                         "corrupt or forged")


def lazy_level(read: LevelReader, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype) -> da.Array:
    """A dask (Y, X, C) level of `shape` whose (chunks[0], chunks[1]) blocks come from `read`, for
    backends that hand out regions (a library's read_region) rather than an array."""
    def grid(n: int, c: int) -> tuple[int, ...]:
        return tuple(min(c, n - i) for i in range(0, n, c))

    def block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return read(y0, y1, x0, x1)

    dtype = np.dtype(dtype)
    blocks = (grid(int(shape[0]), int(chunks[0])), grid(int(shape[1]), int(chunks[1])), (int(shape[2]),))
    return da.map_blocks(block, chunks=blocks, dtype=dtype, meta=np.empty((0, 0, 0), dtype))


def as_mpp_pair(mpp: MppLike, what: str) -> Optional[tuple[float, float]]:
    """(x, y) um/px from a number or a pair; refuses zero, negative and non-finite sizes."""
    if mpp is None:
        return None
    pair = (mpp, mpp) if np.isscalar(mpp) else tuple(mpp)
    if len(pair) != 2:
        raise SlideError(f"mpp for {what} must be a number or an (x, y) pair, got {mpp!r}")
    try:
        out = (float(pair[0]), float(pair[1]))
    except (TypeError, ValueError):
        raise SlideError(f"mpp for {what} must be numeric, got {mpp!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise SlideError(f"mpp for {what} must be positive micrometres per pixel, got {mpp!r}")
    return out


class Slide:
    """A slide opened lazily: `levels[i]` are (Y, X, C) dask arrays chunked on the file's tiles."""

    def __init__(
        self,
        path: Path,
        format: str,
        levels: Sequence[da.Array],
        readers: Sequence[LevelReader],
        channel_names: Sequence[str],
        is_rgb: bool,
        file_mpp: MppLike = None,
        user_mpp: MppLike = None,
        objective_power: Optional[float] = None,
        associated_images: Optional[dict[str, np.ndarray]] = None,
        channel_colors: Optional[Sequence[Optional[str]]] = None,
        metadata: Optional[dict] = None,
        close: Optional[Callable[[], None]] = None,
        origin_um: Optional[tuple[float, float]] = None,
    ) -> None:
        self.path = Path(path)
        self.format = format
        self.levels = list(levels)
        self._readers = list(readers)
        self.channel_names = list(channel_names)
        self.channel_colors = list(channel_colors) if channel_colors else [None] * len(self.channel_names)
        self.is_rgb = is_rgb
        self.objective_power = objective_power
        self.associated_images = dict(associated_images or {})
        #: Free-form metadata the file carried (e.g. what `write_ome_zarr(metadata=...)` stored).
        self.metadata = dict(metadata or {})
        #: (y, x) um of level-0 pixel 0's centre when the file places the image (NGFF translation).
        self.origin_um = origin_um
        self._close = close
        override = as_mpp_pair(user_mpp, str(self.path))
        found = as_mpp_pair(file_mpp, str(self.path))
        self.mpp: Optional[tuple[float, float]] = override or found
        self.mpp_known = self.mpp is not None
        if not self.mpp_known:
            warnings.warn(
                f"slide {self.path} has no pixel size (mpp) in its metadata; physical scale is unknown. "
                "Pass mpp=... to open_slide if you know it.",
                UserWarning,
                stacklevel=3,
            )

    # -- geometry -------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(lv.shape[1]), int(lv.shape[0])) for lv in self.levels]

    @property
    def level_downsamples(self) -> list[float]:
        w0, h0 = self.dimensions
        return [(w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions]

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, format={self.format!r}, dimensions={self.dimensions}, "
                f"levels={len(self.levels)}, channels={self.channel_names}, mpp={self.mpp})")

    # -- reading --------------------------------------------------------------------------------
    def _check_region(self, location: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
        W, H = self.dimensions
        try:
            x, y = (int(v) for v in location)
            w, h = (int(v) for v in size)
        except (TypeError, ValueError):
            raise RegionError(f"region location {location!r} / size {size!r} for {self.path} must be "
                              "two integer pairs (x, y) and (w, h)") from None
        if w <= 0 or h <= 0:
            raise RegionError(f"region size {w}x{h} for {self.path} must be positive (width and height > 0)")
        if x < 0 or y < 0 or x + w > W or y + h > H:
            raise RegionError(
                f"region x={x}, y={y}, w={w}, h={h} lies (partly) outside slide {self.path} of size "
                f"{W}x{H} (level-0 pixels); clip it to 0 <= x, x + w <= {W}, 0 <= y, y + h <= {H}"
            )
        return x, y, w, h

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            return np.asarray(self._readers[level](y0, y1, x0, x1))
        except MuPDError:
            raise
        except Exception as exc:  # decoder / store failures: say which file, not a deep traceback
            raise SlideError(f"could not read pixels from {self.path} (level {level}): "
                             f"{type(exc).__name__}: {exc}") from exc

    def read_region(self, location: tuple[int, int], size: tuple[int, int],
                    mpp: Optional[float] = None) -> np.ndarray:
        """(h', w', C) pixels of a level-0 box; with `mpp`, from the best level, resampled to it."""
        x, y, w, h = self._check_region(location, size)
        if mpp is None:
            return self._read_level(0, x, y, x + w, y + h)
        target = as_mpp_pair(mpp, f"read_region on {self.path}")[0]
        if self.mpp is None:
            raise RegionError(f"cannot read {self.path} at {target} um/px: the slide has no known mpp; "
                              "open it with open_slide(path, mpp=...)")
        out_w = round(w * self.mpp[0] / target)
        out_h = round(h * self.mpp[1] / target)
        if out_w < 1 or out_h < 1:
            raise RegionError(f"region {w}x{h} of {self.path} at {target} um/px is smaller than one pixel")
        level = self.best_level_for_downsample(min(w / out_w, h / out_h))
        ds_x = self.dimensions[0] / self.level_dimensions[level][0]
        ds_y = self.dimensions[1] / self.level_dimensions[level][1]
        return resample_window(array_reader(_LevelPixels(self, level)), x / ds_x, y / ds_y,
                               out_w, out_h, w / out_w / ds_x, h / out_h / ds_y)

    def best_level_for_downsample(self, factor: float) -> int:
        """The coarsest level that is still at least as fine as `factor` (never upsample a coarse one)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= factor * (1 + 1e-3):
                best = i
        return best

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide with its longer side at most `max_size` pixels (from the coarsest level that suffices)."""
        if int(max_size) < 1:
            raise RegionError(f"thumbnail size {max_size} for {self.path} must be a positive number of pixels")
        W, H = self.dimensions
        scale = min(1.0, max_size / max(W, H))
        out_w, out_h = max(1, round(W * scale)), max(1, round(H * scale))
        level = self.best_level_for_downsample(min(W / out_w, H / out_h))
        lw, lh = self.level_dimensions[level]
        return resample_window(array_reader(_LevelPixels(self, level)), 0.0, 0.0, out_w, out_h,
                               lw / out_w, lh / out_h)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LevelPixels:
    """A level as `array_reader` slices it: through `Slide._read_level`, so errors name the file."""

    def __init__(self, slide: Slide, level: int) -> None:
        self.slide, self.level = slide, level
        self.shape = slide.levels[level].shape

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        return self.slide._read_level(self.level, cols.start, rows.start, cols.stop, rows.stop)
