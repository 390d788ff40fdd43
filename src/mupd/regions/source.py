"""The pixels a region's tiles are cut from: slide pyramid levels, or a window of one in memory.

Every tile is read at the model's mpp from the coarsest pyramid level still finer than it, by
the one resampler (`mupd.io.resample`) that also cuts the training tiles. `ArraySlide` offers
pixels already in memory (an upload to the server, a test image) the way an opened slide
does, so the same reads give the same tiles whichever holds the pixels.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..errors import RegionError, SlideError
from ..io.resample import resample_window
from .plan import RegionPlan, level_sizes_of, pick_level


class ArraySlide:
    """RGB pixels already in memory (an upload to the server, a test image), read like a slide.

    It offers what RegionTranslator reads from an opened slide: `path`, `mpp` (x, y) of level 0,
    `dimensions` (level-0 width, height) and `levels`. By default `image` is the whole slide at
    level 0. An upload is a window of one pyramid level of a bigger slide instead (`from_slide`):
    `origin` is its top-left level pixel, `level_size` the level's (width, height) and
    `dimensions` level 0's, so the region's plan (`regions.plan`) picks that level and the same
    tile coordinates, hence the tiles read the same pixels, as on the slide file itself.
    """

    def __init__(self, image: np.ndarray, mpp: float | Sequence[float], path: str = "<memory>",
                 origin: tuple[int, int] = (0, 0), level_size: Optional[tuple[int, int]] = None,
                 dimensions: Optional[tuple[int, int]] = None) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise SlideError(f"{path}: expected an (H, W, 3) uint8 RGB image, got "
                             f"{image.shape} {image.dtype}")
        mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp
        self.image, self.path, self.mpp = image[..., :3], path, (float(mx), float(my))
        self.origin = (int(origin[0]), int(origin[1]))
        h, w = image.shape[:2]
        self.level_size = tuple(int(v) for v in (level_size or (self.origin[0] + w, self.origin[1] + h)))
        self._dimensions = tuple(int(v) for v in (dimensions or self.level_size))
        (x, y), (lw, lh), (W, H) = self.origin, self.level_size, self._dimensions
        if min(x, y) < 0 or x + w > lw or y + h > lh or not 0 < lw <= W or not 0 < lh <= H:
            raise SlideError(f"{path}: a {w}x{h} px window at level pixel ({x}, {y}) does not fit a "
                             f"{lw}x{lh} px level of a {W}x{H} px slide")

    @classmethod
    def from_slide(cls, slide: Any, plan: RegionPlan) -> "ArraySlide":
        """The pixels translating `plan` (a region of `slide`) reads: the window of the plan's
        level that every tile's read falls in (`RegionPlan.level_window`)."""
        ua, va, ub, vb = plan.level_window()
        level = slide.levels[plan.level] if plan.level is not None else None
        return cls(read_window(slide, level, ua, va, ub, vb), slide.mpp, path=str(slide.path),
                   origin=(ua, va), level_size=plan.level_size, dimensions=tuple(slide.dimensions))

    def frame(self) -> dict[str, list[int]]:
        """Where the window sits in its slide, as JSON: the keyword arguments `origin`,
        `level_size` and `dimensions` that rebuild this ArraySlide from its image and mpp."""
        return {"origin": list(self.origin), "level_size": list(self.level_size),
                "dimensions": list(self._dimensions)}

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dimensions

    @property
    def levels(self) -> list["_WindowLevel"]:
        return [_WindowLevel(self)]

    def read_region(self, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Level-0 pixels; only for an image that is a window of level 0."""
        if self.level_size != self._dimensions:
            raise SlideError(f"{self.path}: holds a downsampled level, not level-0 pixels")
        (x, y), (w, h) = location, size
        return _WindowLevel(self)[y : y + h, x : x + w]

    def __enter__(self) -> "ArraySlide":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _WindowLevel:
    """An ArraySlide's level as `read_window` indexes it: full-level shape, in-window reads only."""

    def __init__(self, slide: ArraySlide) -> None:
        self.slide = slide
        self.shape = (slide.level_size[1], slide.level_size[0], 3)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        (x, y), (h, w) = self.slide.origin, self.slide.image.shape[:2]
        y0, y1, x0, x1 = rows.start - y, rows.stop - y, cols.start - x, cols.stop - x
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            raise RegionError(f"{self.slide.path}: level pixels x {cols.start}..{cols.stop}, "
                              f"y {rows.start}..{rows.stop} lie outside the {w}x{h} px window held "
                              f"at ({x}, {y})")
        return self.slide.image[y0:y1, x0:x1]


def read_tile(slide: Any, x: float, y: float, tile: int, factor: float) -> np.ndarray:
    """A tile x tile RGB tile at the model's mpp whose corner is level-0 edge point (x, y).

    Output pixel (r, c) is the area sample centred on level-0 edge point
    (x + (c + 0.5) * factor, y + (r + 0.5) * factor): exactly the grid `Placement` describes, so
    overlays register to the slide to well under a level-0 pixel. Read from the coarsest pyramid
    level that is still finer than the model's mpp (`plan.pick_level`) by the one resampler
    (`mupd.io.resample`, which also cuts the training tiles); off-slide is white.
    """
    return read_box(slide, x, y, tile, tile, factor)


def read_box(slide: Any, x: float, y: float, out_w: int, out_h: int, factor: float) -> np.ndarray:
    """(out_h, out_w, 3) uint8 on `read_tile`'s grid (any size, e.g. a region's preview)."""
    index, dsx, dsy = pick_level(slide.dimensions, level_sizes_of(slide), factor)
    level = slide.levels[index] if index is not None else None
    return resample_window(lambda x0, y0, x1, y1: read_window(slide, level, x0, y0, x1, y1),
                           x / dsx, y / dsy, out_w, out_h, factor / dsx, factor / dsy)


def read_window(slide: Any, level: Any, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Level pixels [y0:y1, x0:x1] as RGB uint8; the part off the slide is white."""
    H, W = (level.shape[0], level.shape[1]) if level is not None else slide.dimensions[::-1]
    canvas = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if cx1 > cx0 and cy1 > cy0:
        if level is None:
            region = slide.read_region((cx0, cy0), (cx1 - cx0, cy1 - cy0))
        else:
            region = np.asarray(level[cy0:cy1, cx0:cx1])
        canvas[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = region[..., :3]
    return canvas
