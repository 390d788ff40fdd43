"""A region's geometry, planned once: output grid, tile origins, pyramid level and placement.

Translation (`regions.translate`), the window a remote client uploads (`ArraySlide.from_slide`)
and the server's size check must agree on every number here: an upload holds exactly the
pixels the server's tiles read only if both derive the same grid and level, and the size the
server refuses must be the output the translator would make. So they all call `plan_region`,
a pure function (numbers in: the slide's size, levels and mpp, the region, the model's tiles;
a frozen `RegionPlan` out; no pixels read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import RegionError

Ring = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SlideGeometry:
    """What planning needs of a slide: level-0 `dimensions` (width, height) and `mpp` (x, y),
    and the (width, height) of each pyramid level, finest first (empty: the slide offers only
    `read_region`, read at level 0). `path` names the slide in errors."""

    dimensions: tuple[int, int]
    mpp: tuple[float, float]
    level_sizes: tuple[tuple[int, int], ...] = ()
    path: str = "<memory>"

    @classmethod
    def of(cls, slide: Any) -> "SlideGeometry":
        """An opened slide's (mupd.io.Slide, ArraySlide, a test double); its mpp must be set."""
        return cls(tuple(int(v) for v in slide.dimensions), tuple(float(v) for v in slide.mpp),
                   level_sizes_of(slide), str(slide.path))


@dataclass(frozen=True)
class TileSpec:
    """The model's tiles: `size` px at `mpp` um/px, overlapping by `overlap` px, with origins on
    multiples of `step` (the latent step). Only the tile origins depend on `overlap` and `step`;
    the output grid, level, placement and upload window do not (a remote client knows only
    `size` and `mpp`)."""

    size: int
    mpp: float
    overlap: int = 0
    step: int = 1


@dataclass(frozen=True)
class Placement:
    """Where an output grid lies over its source slide: it covers level-0 `box` (x, y, w, h),
    and its pixel (i, j) is centred at `translate_um + (i, j) * scale_um` ((y, x) micrometres,
    napari's pixel-centre convention)."""

    box: tuple[int, int, int, int]
    scale_um: tuple[float, float]
    translate_um: tuple[float, float]

    @property
    def mpp(self) -> float:
        """Micrometres per output pixel."""
        return self.scale_um[1]

    @classmethod
    def of(cls, box: tuple[int, int, int, int], slide_mpp: tuple[float, float],
           out_mpp: float) -> "Placement":
        """The placement of an `out_mpp` grid whose pixel 0 starts at the box's corner.

        napari puts pixel i's centre at translate + i * scale; level-0 pixel j's centre sits at
        j * mpp0, so the box corner (level-0 pixel edge x) is at (x - 0.5) * mpp0 in world units.
        """
        mx, my = slide_mpp
        x, y = box[0], box[1]
        translate = ((y - 0.5) * my + 0.5 * out_mpp, (x - 0.5) * mx + 0.5 * out_mpp)
        return cls(tuple(box), (out_mpp, out_mpp), translate)


@dataclass(frozen=True)
class TileGrid:
    """Tile origins (in output pixels) covering an output of `height` x `width`.

    Origins are multiples of `step` (the model's latent step), so that overlapping tiles cut
    their starting noise from one shared field (`MuPDPipeline.translate(positions=...)`).
    """

    height: int
    width: int
    tile: int
    overlap: int
    step: int = 1

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def _starts(self, length: int) -> list[int]:
        if length <= self.tile:
            return [0]
        n = math.ceil((length - self.tile) / self.stride) + 1
        starts = [i * self.stride for i in range(n)]
        # last tile flush with the edge (no padding inside the ROI), or up to step - 1 px past it
        starts[-1] = -(-(length - self.tile) // self.step) * self.step
        return sorted(set(starts))

    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self._starts(self.height) for x in self._starts(self.width)]


@dataclass(frozen=True)
class RegionPlan:
    """A region's geometry at the model's mpp (see `plan_region`).

    `factor` is level-0 pixels per output pixel; `level` the pyramid level tiles are read from
    (None: level 0 through `read_region`), `level_size` its (width, height) and `downsample`
    its (x, y) level-0 pixels per level pixel. The tile origins and the tiles that miss the
    polygon are computed when first asked for (a size check needs neither).
    """

    box: tuple[int, int, int, int]
    slide_mpp: tuple[float, float]
    tiles: TileSpec
    factor: float
    out_shape: tuple[int, int]
    level: Optional[int]
    level_size: tuple[int, int]
    downsample: tuple[float, float]
    polygon: Optional[Ring] = None  # level-0 outline; None: the box
    holes: tuple[Ring, ...] = ()  # rings cut out of the polygon

    @property
    def out_mpp(self) -> float:
        return self.tiles.mpp

    @property
    def n_pixels(self) -> int:
        return self.out_shape[0] * self.out_shape[1]

    @property
    def placement(self) -> Placement:
        return Placement.of(self.box, self.slide_mpp, self.out_mpp)

    @cached_property
    def origins(self) -> list[tuple[int, int]]:
        """Tile origins (output pixels, (y, x)), row by row."""
        t = self.tiles
        return TileGrid(*self.out_shape, t.size, t.overlap, t.step).origins()

    @cached_property
    def outside(self) -> frozenset:
        """Origins of tiles whose footprint misses the polygon (less its holes): not run."""
        if self.polygon is None:
            return frozenset()
        from shapely.geometry import box

        region = region_geometry(self.polygon, self.holes)
        x0, y0, f, T = self.box[0], self.box[1], self.factor, self.tiles.size

        def footprint(oy: int, ox: int) -> Any:
            return box(x0 + ox * f, y0 + oy * f, x0 + (ox + T) * f, y0 + (oy + T) * f)

        return frozenset((oy, ox) for oy, ox in self.origins
                         if not region.intersects(footprint(oy, ox)))

    def level_window(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the pixels of `level` that every tile's read (padding included)
        falls in, clipped to the level. Tiles start inside the output and end at most
        `size - 1` output pixels past it (TileGrid), which bounds the window whatever the
        overlap and step."""
        from ..io.resample import source_window

        T, f, (dsx, dsy) = self.tiles.size, self.factor, self.downsample
        x0, y0 = self.box[0], self.box[1]
        out_h, out_w = self.out_shape
        ends = [max(n, T) + (T - 1 if n > T else 0) for n in (out_w, out_h)]
        ua, va = source_window(x0 / dsx, y0 / dsy, T, T, f / dsx, f / dsy)[:2]
        ub, vb = source_window((x0 + (ends[0] - T) * f) / dsx, (y0 + (ends[1] - T) * f) / dsy,
                               T, T, f / dsx, f / dsy)[2:]
        lw, lh = self.level_size
        return max(ua, 0), max(va, 0), min(ub, lw), min(vb, lh)

    def annotation(self, name: Optional[str] = None) -> Any:
        """The region as a QuPath annotation (`mupd.io.Region`): its polygon and holes, or the box."""
        from ..io.geojson import Region

        x, y, w, h = self.box
        outline = self.polygon or [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
        return Region([tuple(map(float, p)) for p in outline], name=name,
                      shape="polygon" if self.polygon else "rectangle",
                      holes=[[tuple(map(float, p)) for p in hole] for hole in self.holes])


def plan_region(slide: SlideGeometry, tiles: TileSpec,
                box: Optional[Sequence[int]] = None,
                polygon: Optional[Sequence[tuple[float, float]]] = None,
                holes: Sequence[Sequence[tuple[float, float]]] = ()) -> RegionPlan:
    """The geometry of a region of `slide` translated with `tiles`: a box (level-0 x, y, w, h),
    or a polygon (its bounding box; tiles that miss it, or lie in one of its `holes`, are not
    run), or by default the whole slide. Refuses (RegionError) regions that are empty, off the
    slide, or polygons and holes of fewer than 3 points."""
    if holes and polygon is None:
        raise RegionError("holes need the polygon they are cut out of")
    for k, hole in enumerate(holes):
        if len(hole) < 3:
            raise RegionError(f"hole {k} of the region needs at least 3 (x, y) points, got {len(hole)}")
    if polygon is not None:
        box = box_from_polygon(polygon)
    if box is None:
        box = (0, 0, *slide.dimensions)
    box = tuple(int(v) for v in box)
    check_box(box, slide.dimensions, f"slide {slide.path}")
    factor = tiles.mpp / float(np.mean(slide.mpp))
    w, h = box[2], box[3]
    level, dsx, dsy = pick_level(slide.dimensions, slide.level_sizes, factor)
    ring = rings = None
    if polygon is not None:
        ring = tuple((float(px), float(py)) for px, py in polygon)
        rings = tuple(tuple((float(px), float(py)) for px, py in hole) for hole in holes)
    return RegionPlan(
        box=box, slide_mpp=slide.mpp, tiles=tiles, factor=factor,
        out_shape=(max(1, round(h / factor)), max(1, round(w / factor))), level=level,
        level_size=slide.level_sizes[level] if level is not None else slide.dimensions,
        downsample=(dsx, dsy), polygon=ring, holes=rings or (),
    )


def level_sizes_of(slide: Any) -> tuple[tuple[int, int], ...]:
    """(width, height) of each of a slide's `levels` ((Y, X, C) arrays, lazy for files), finest
    first; none for a slide that only has `read_region` (a test double)."""
    return tuple((int(lv.shape[1]), int(lv.shape[0])) for lv in getattr(slide, "levels", None) or ())


def pick_level(dimensions: tuple[int, int], sizes: Sequence[tuple[int, int]],
               factor: float) -> tuple[Optional[int], float, float]:
    """(index, x downsample, y downsample) of the coarsest level (of `sizes`, see `level_sizes_of`)
    still finer than `factor` level-0 pixels per output pixel; (None, 1, 1) without levels."""
    if not sizes:
        return None, 1.0, 1.0
    W, H = dimensions
    best = 0
    for i, (lw, lh) in enumerate(sizes):
        if (W / lw + H / lh) / 2 <= factor * (1 + 1e-3):
            best = i
    lw, lh = sizes[best]
    return best, W / lw, H / lh


def box_from_polygon(polygon: Sequence[tuple[float, float]]) -> tuple[int, int, int, int]:
    pts = np.asarray(polygon, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise RegionError(f"a polygon needs at least 3 (x, y) points, got {len(pts)}")
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def check_box(box: tuple[int, int, int, int], dimensions: tuple[int, int], where: str) -> None:
    x, y, w, h = box
    W, H = dimensions
    if w <= 0 or h <= 0:
        raise RegionError(f"region {w}x{h} px of {where} is empty: width and height must be > 0")
    if x < 0 or y < 0 or x + w > W or y + h > H:
        raise RegionError(
            f"region x={x}, y={y}, {w}x{h} px lies outside {where}, which is {W}x{H} px at level 0"
        )


def region_geometry(polygon: Sequence[tuple[float, float]],
                    holes: Sequence[Sequence[tuple[float, float]]] = ()) -> Any:
    """A region's polygon less its holes, as one valid shapely geometry (level-0 pixels)."""
    from shapely.geometry import Polygon

    return Polygon(polygon, [list(h) for h in holes]).buffer(0)
