"""ROI and whole-slide translation: tiles at the model's mpp, feathered overlaps, bounded memory.

The slide is read tile by tile at the model's working magnification, background tiles are
skipped, tiles overlap and are blended with a feathered window (weights normalised, so the
result has no seams), and the sums live in zarr arrays on disk for large regions so that a
whole section never sits in memory. Tiles cut their starting noise from one noise field over
the region (`translate(positions=...)`): a diffusion model's output follows its noise, so with
a draw per tile neighbours would predict different things where they overlap. The placement of every output is given in micrometres
in the source slide's frame (napari's pixel-centre convention).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from .colors import colormap_hex
from .errors import RegionError, SlideError
from .io.resample import resample_window, source_window
from .names import ihc_name
from .progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .render import MarkerMap, render_ihc_cells
from .scores import CellReadout, MarkerScore

#: Regions with more output pixels than this accumulate on disk instead of in memory.
IN_MEMORY_LIMIT_PX = 4096 * 4096
#: Long side (px) of the region preview a stain normalisation is estimated on.
PREVIEW_SIDE = 1024


@dataclass
class OutputLayer:
    """One translated stain over the ROI; `data` is (H, W, 3) uint8 or (H, W) float32."""

    name: str
    kind: str
    data: Any  # numpy array, or a dask array backed by the output store for large regions
    colormap: str = "gray"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegionTranslation:
    layers: list[OutputLayer]
    box: tuple[int, int, int, int]  # level-0 x, y, w, h of the region
    output_mpp: float
    scale_um: tuple[float, float]
    translate_um: tuple[float, float]
    n_tiles: int
    n_skipped: int
    seconds: float
    #: Disk-backed sums the (lazy) layers still read; None when the layers are in memory.
    workdir: Optional[Path] = None
    #: The region's outline and holes (level-0 (x, y)); None: the box.
    polygon: Optional[list[tuple[float, float]]] = None
    holes: list[list[tuple[float, float]]] = field(default_factory=list)
    #: Per-marker read-outs over the region's cells (`mupd.scores`), and the cells; only when
    #: marker maps were rendered as IHC (the cells are the renderer's).
    scores: list[MarkerScore] = field(default_factory=list)
    cells: Optional[CellReadout] = None

    def annotation(self, name: Optional[str] = None) -> Any:
        """The region as a QuPath annotation (`mupd.io.Region`)."""
        from .io.geojson import Region

        x, y, w, h = self.box
        outline = self.polygon or [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
        return Region([tuple(map(float, p)) for p in outline], name=name,
                      shape="polygon" if self.polygon else "rectangle",
                      holes=[[tuple(map(float, p)) for p in hole] for hole in self.holes])

    def load(self) -> "RegionTranslation":
        """Bring every layer into memory and drop the disk-backed sums (a no-op in memory)."""
        if self.workdir is not None:
            for layer in self.layers:
                layer.data = np.asarray(layer.data)
            self.close()
        return self

    def close(self) -> None:
        """Remove the disk-backed sums (the layers must have been loaded or written first)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


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


class ArraySlide:
    """RGB pixels already in memory (an upload to the server, a test image), read like a slide.

    It offers what RegionTranslator reads from an opened slide: `path`, `mpp` (x, y) of level 0,
    `dimensions` (level-0 width, height) and `levels`. By default `image` is the whole slide at
    level 0. An upload is a window of one pyramid level of a bigger slide instead (`from_slide`):
    `origin` is its top-left level pixel, `level_size` the level's (width, height) and
    `dimensions` level 0's, so RegionTranslator picks that level and computes the same tile
    coordinates, hence reads the same pixels, as on the slide file itself.
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
    def from_slide(cls, slide: Any, box: tuple[int, int, int, int], out_mpp: float,
                   tile: int) -> "ArraySlide":
        """The pixels RegionTranslator reads to translate `box` of `slide` at `out_mpp` with
        `tile`-pixel tiles: the window of the level `_pick_level` chooses that every tile's read
        (padding included) falls in, clipped to the slide. Tiles start inside the output and
        end at most `tile - 1` output pixels past it (TileGrid), which bounds the window."""
        factor = out_mpp / float(np.mean(slide.mpp))
        level, dsx, dsy = _pick_level(slide, factor)
        x0, y0, w, h = box
        out_w, out_h = max(1, round(w / factor)), max(1, round(h / factor))
        ends = [max(n, tile) + (tile - 1 if n > tile else 0) for n in (out_w, out_h)]
        ua, va = source_window(x0 / dsx, y0 / dsy, tile, tile, factor / dsx, factor / dsy)[:2]
        ub, vb = source_window((x0 + (ends[0] - tile) * factor) / dsx,
                               (y0 + (ends[1] - tile) * factor) / dsy,
                               tile, tile, factor / dsx, factor / dsy)[2:]
        W, H = slide.dimensions
        lh, lw = (level.shape[0], level.shape[1]) if level is not None else (H, W)
        ua, va, ub, vb = max(ua, 0), max(va, 0), min(ub, lw), min(vb, lh)
        return cls(_read_window(slide, level, ua, va, ub, vb), slide.mpp, path=str(slide.path),
                   origin=(ua, va), level_size=(lw, lh), dimensions=(W, H))

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
    """An ArraySlide's level as `_read_window` indexes it: full-level shape, in-window reads only."""

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


def feather_window(tile: int, overlap: int) -> np.ndarray:
    """2-D blending weights: 1 inside, a raised-cosine ramp across the overlap margins."""
    ramp = np.ones(tile, dtype=np.float32)
    if overlap > 0:
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
        ramp[:overlap] = edge
        ramp[tile - overlap :] = edge[::-1]
    return np.maximum(np.outer(ramp, ramp), 1e-3)


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


def placement(box: tuple[int, int, int, int], slide_mpp: tuple[float, float], out_mpp: float):
    """(scale_um, translate_um) for an output grid whose pixel 0 starts at the box's corner.

    napari puts pixel i's centre at translate + i * scale; level-0 pixel j's centre sits at
    j * mpp0, so the box corner (level-0 pixel edge x) is at (x - 0.5) * mpp0 in world units.
    """
    mx, my = slide_mpp
    x, y = box[0], box[1]
    translate = ((y - 0.5) * my + 0.5 * out_mpp, (x - 0.5) * mx + 0.5 * out_mpp)
    return (out_mpp, out_mpp), translate


#: Fixed-point scale of the blending sums. Integer addition is associative, so the sums (and
#: the output) are bit-identical however the tiles are split across processes or ordered.
FIXED_POINT = float(2**32)


class _Accumulator:
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
        """Add (y, x, value) tiles; tiles of one grid row share one read-modify-write of the sums
        (on disk, a write per tile would rewrite every chunk under it several times)."""
        rows: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        for y, x, value in tiles:
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
class RegionPlan:
    """Everything fixed before any tile runs: every process of a distributed run derives the
    same plan, so a rank can process any subset of its batches."""

    slide_path: str
    slide_mpp: tuple[float, float]
    targets: list[Any]
    box: tuple[int, int, int, int]
    factor: float  # level-0 pixels per output pixel
    out_mpp: float
    out_shape: tuple[int, int]
    batches: list[list[tuple[int, int]]]  # tile origins (output pixels), in batch_size groups
    outside: frozenset = frozenset()  # origins of tiles that miss the ROI polygon (not run)
    polygon: Optional[tuple[tuple[float, float], ...]] = None  # level-0 outline; None: the box
    holes: tuple[tuple[tuple[float, float], ...], ...] = ()  # rings cut out of the polygon
    #: fitted once on a preview of the whole region, applied to every tile (mupd.stain_norm)
    stain_norm: Optional[Any] = None

    @property
    def n_tiles(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass
class RegionSums:
    """The partial blending sums of one process: one accumulator per output, plus the weights."""

    outputs: dict[str, _Accumulator]
    weight: _Accumulator
    workdir: Path
    on_disk: bool
    n_skipped: int = 0
    #: The blended source H&E, kept when marker maps are to be rendered as IHC: the rendering
    #: segments cells, so it runs once on the blended region, not per (overlapping) tile.
    source: Optional[_Accumulator] = None

    def arrays(self) -> list[Any]:
        """Every sum array in a fixed order (for reducing across processes)."""
        extra = [self.source.sum] if self.source is not None else []
        return [self.outputs[k].sum for k in sorted(self.outputs)] + [self.weight.sum] + extra


class RegionTranslator:
    """Runs a pipeline over a region of a slide; the CLI, server and plugin all use this.

    `__call__` does a whole region; `plan`, `new_sums`, `accumulate` and `finish` are its steps,
    so that a distributed run (mupd.distributed) can give each process a share of the batches.
    """

    def __init__(self, pipeline: Any, batch_size: int = 8, overlap: float = 0.25,
                 tissue_only: bool = True) -> None:
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.step = int(pipeline.latent_step)
        # the stride (tile - overlap) stays a multiple of the latent step
        self.overlap = int(pipeline.tile_size - self.step * round(
            pipeline.tile_size * (1 - overlap) / self.step))
        self.tissue_only = tissue_only

    def __call__(
        self,
        slide: Any,
        stains: Sequence[str],
        box: Optional[tuple[int, int, int, int]] = None,
        polygon: Optional[Sequence[tuple[float, float]]] = None,
        steps: int = 1,
        guidance: Optional[dict[str, float]] = None,
        seed: int = 0,
        render_brightfield: bool = True,
        workdir: Optional[Path] = None,
        holes: Sequence[Sequence[tuple[float, float]]] = (),
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        stain_norm: Optional[str] = None,
        stain_reference: Optional[str | Path] = None,
        strength: Optional[float] = None,
        prompt: Optional[str] = None,
    ) -> RegionTranslation:
        start = time.perf_counter()
        if strength is not None:  # refused before any tile is read
            from .pipeline import check_image_to_image

            check_image_to_image([self.pipeline.catalogue.get(s) for s in stains], strength)
        plan = self.plan(slide, stains, box=box, polygon=polygon, holes=holes, stain_norm=stain_norm,
                         stain_reference=stain_reference)
        sums = self.new_sums(plan, render_brightfield, workdir)
        try:
            self.accumulate(slide, plan, plan.batches, sums, steps=steps, guidance=guidance,
                            seed=seed, render_brightfield=render_brightfield,
                            progress=progress, cancel=cancel, strength=strength, prompt=prompt)
            return self.finish(plan, sums, start)
        except BaseException:
            shutil.rmtree(sums.workdir, ignore_errors=True)
            raise

    def plan(self, slide: Any, stains: Sequence[str],
             box: Optional[tuple[int, int, int, int]] = None,
             polygon: Optional[Sequence[tuple[float, float]]] = None,
             holes: Sequence[Sequence[tuple[float, float]]] = (),
             stain_norm: Optional[str] = None,
             stain_reference: Optional[str | Path] = None) -> RegionPlan:
        """Tiles, output grid and placement of a region: a box, or a polygon (its bounding box;
        tiles that miss it, or lie in one of its `holes`, are not run). `stain_norm` (macenko /
        reinhard): the region's stain, estimated once on a preview of it, is mapped onto
        `stain_reference` (default: the training data's) in every tile."""
        from .stain_norm import check_method, fit_normalization

        stain_norm = check_method(stain_norm)
        targets = [self.pipeline.catalogue.get(s) for s in stains]  # unknown stain -> clear error
        if not targets:
            raise RegionError("no target stain given: name at least one stain or marker")
        if slide.mpp is None:
            raise SlideError(
                f"{slide.path}: the slide has no microns-per-pixel value; give one (e.g. --mpp 0.5)"
            )
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
        if getattr(slide, "is_rgb", True) is False:
            raise SlideError(f"{slide.path}: translation needs an RGB brightfield (H&E) slide; this one "
                             f"has channels {getattr(slide, 'channel_names', '?')}")
        mpp0 = float(np.mean(slide.mpp))
        out_mpp = float(self.pipeline.mpp)
        factor = out_mpp / mpp0
        x0, y0, w, h = box
        out_h, out_w = max(1, round(h / factor)), max(1, round(w / factor))
        T = self.pipeline.tile_size
        origins = TileGrid(out_h, out_w, T, self.overlap, self.step).origins()
        outside: frozenset = frozenset()
        ring = holes_ = None
        if polygon is not None:
            ring = tuple((float(px), float(py)) for px, py in polygon)
            holes_ = tuple(tuple((float(px), float(py)) for px, py in h) for h in holes)
            outside = _tiles_outside(region_geometry(ring, holes_), origins, T, x0, y0, factor)
        normalization = None
        if stain_norm is not None:
            f = max(factor, max(w, h) / PREVIEW_SIDE)
            preview = _read_box(slide, x0, y0, max(1, round(w / f)), max(1, round(h / f)), f)
            normalization = fit_normalization(stain_norm, preview, stain_reference,
                                              f"region {box} of {slide.path}")
        return RegionPlan(
            slide_path=str(slide.path), slide_mpp=tuple(slide.mpp), targets=targets, box=box,
            factor=factor, out_mpp=out_mpp, out_shape=(out_h, out_w),
            batches=list(_batched(origins, self.batch_size)), outside=outside,
            polygon=ring, holes=holes_ or (), stain_norm=normalization,
        )

    def new_sums(self, plan: RegionPlan, render_brightfield: bool,
                 workdir: Optional[Path] = None) -> RegionSums:
        from .io.atomic import owned_tempdir

        tmp = owned_tempdir("mupd-acc-", workdir)  # also removes those of killed runs
        on_disk = plan.out_shape[0] * plan.out_shape[1] > IN_MEMORY_LIMIT_PX

        chunk = max(self.pipeline.tile_size, 256)  # a tile touches at most 4 chunks

        def make(name, extra=()):
            return _Accumulator(plan.out_shape + extra, tmp / f"{name}.zarr" if on_disk else None, chunk)

        acc = {t.name: make(t.name, (3,) if t.kind == "rgb" else ()) for t in plan.targets}
        render = render_brightfield and any(t.kind == "marker" for t in plan.targets)
        return RegionSums(acc, make("_weight"), tmp, on_disk,
                          source=make("_source", (3,)) if render else None)

    def accumulate(
        self,
        slide: Any,
        plan: RegionPlan,
        batches: Sequence[Sequence[tuple[int, int]]],
        sums: RegionSums,
        steps: int = 1,
        guidance: Optional[dict[str, float]] = None,
        seed: int = 0,
        render_brightfield: bool = True,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        strength: Optional[float] = None,
        prompt: Optional[str] = None,
    ) -> None:
        """Add the blended outputs of `batches` (a subset of `plan.batches`) into `sums`.
        `strength` / `prompt`: image-to-image for RGB stains (`MuPDPipeline.translate`)."""
        progress = progress or no_progress
        T = self.pipeline.tile_size
        out_h, out_w = plan.out_shape
        window = feather_window(T, min(self.overlap, T // 2))
        x0, y0 = plan.box[0], plan.box[1]
        total = sum(len(b) for b in batches)
        done = 0
        progress(ProgressEvent("tiles", 0, total, "translating"))
        for batch in batches:
            if cancel is not None:
                cancel.raise_if_cancelled()
            inside = np.array([o not in plan.outside for o in batch], dtype=bool)
            tiles = np.stack([
                _read_tile(slide, x0 + ox * plan.factor, y0 + oy * plan.factor, T, plan.factor)
                if ins else np.full((T, T, 3), 255, dtype=np.uint8)
                for (oy, ox), ins in zip(batch, inside)
            ])
            if plan.stain_norm is not None:  # the same fitted map on every tile: no seams
                tiles[inside] = plan.stain_norm(tiles[inside])
            keep = inside.copy()
            keep[inside] = self._tissue_mask(tiles[inside])
            sums.n_skipped += int((~keep).sum())
            sums.weight.add([(oy, ox, _crop(window, oy, ox, out_h, out_w)) for oy, ox in batch])
            outputs = {}
            if keep.any():
                outputs = self.pipeline.translate(
                    tiles[keep], [t.name for t in plan.targets], steps=steps, guidance=guidance,
                    seed=seed, batch_size=self.batch_size,
                    positions=[o for o, k in zip(batch, keep) if k],
                    **({} if strength is None else {"strength": strength, "prompt": prompt}),
                )
            kept_index = np.cumsum(keep) - 1
            for name, a in sums.outputs.items():
                blended = []
                for i, (oy, ox) in enumerate(batch):
                    if keep[i]:
                        value = outputs[name][kept_index[i]].astype(np.float32)
                    elif strength is not None:  # image-to-image: glass stays the source's glass
                        value = tiles[i].astype(np.float32)
                    else:
                        value = _background(a.sum.shape, T)
                    win = window if value.ndim == 2 else window[..., None]
                    blended.append((oy, ox, _crop(value * win, oy, ox, out_h, out_w)))
                a.add(blended)
            if sums.source is not None:  # the source as read (identical where tiles overlap)
                sums.source.add([(oy, ox, _crop(tiles[i].astype(np.float32) * window[..., None],
                                                oy, ox, out_h, out_w))
                                 for i, (oy, ox) in enumerate(batch)])
            done += len(batch)
            progress(ProgressEvent("tiles", done, total, f"{done}/{total} tiles"))

    def finish(self, plan: RegionPlan, sums: RegionSums, start: float) -> RegionTranslation:
        """Normalise the (complete) sums into output layers placed over the slide."""
        layers = self._layers(plan.targets, sums.outputs, sums.weight, sums.on_disk, plan.stain_norm)
        scores, cells = [], None
        if sums.source is not None:
            layers, scores, cells = self._with_ihc(plan, layers, sums)
        if not sums.on_disk:
            shutil.rmtree(sums.workdir, ignore_errors=True)
        scale, translate = placement(plan.box, plan.slide_mpp, plan.out_mpp)
        return RegionTranslation(
            layers=layers, box=plan.box, output_mpp=plan.out_mpp, scale_um=scale,
            translate_um=translate, n_tiles=plan.n_tiles, n_skipped=sums.n_skipped,
            seconds=time.perf_counter() - start, workdir=sums.workdir if sums.on_disk else None,
            polygon=list(plan.polygon) if plan.polygon is not None else None,
            holes=[list(h) for h in plan.holes], scores=scores, cells=cells,
        )

    def _tissue_mask(self, tiles: np.ndarray) -> np.ndarray:
        if not self.tissue_only:
            return np.ones(len(tiles), dtype=bool)
        from .data.tissue import is_tissue

        return np.array([is_tissue(t) for t in tiles], dtype=bool)

    def _layers(self, targets, acc, weight, on_disk, stain_norm=None) -> list[OutputLayer]:
        by_name = {t.name: t for t in targets}
        layers = []
        for name, a in acc.items():
            target = by_name.get(name)
            rgb = a.sum.ndim == 3
            if on_disk:
                import dask.array as da

                s, w = da.from_zarr(a.sum), da.from_zarr(weight.sum)
            else:
                s, w = a.sum, weight.sum
            data = s / (w[..., None] if rgb else w)  # fixed-point scales cancel
            data = (data.clip(0, 255).round().astype(np.uint8) if rgb
                    else data.clip(0, 1).astype(np.float32))
            meta = {"target": name, "model_mpp": float(self.pipeline.mpp)}
            if stain_norm is not None:
                meta["stain_normalization"] = stain_norm.to_dict()
            layers.append(OutputLayer(name, target.kind, data, getattr(target, "colormap", "gray") or "gray", meta))
        return layers

    def _with_ihc(self, plan: RegionPlan, layers: list[OutputLayer], sums: RegionSums
                  ) -> tuple[list[OutputLayer], list[MarkerScore], CellReadout]:
        """Each marker layer followed by its rendering as DAB IHC on the blended source H&E,
        and the read-out of every marker over the region's cells (`mupd.scores`): cells
        segmented once over the region (in windows for a large one) for all markers, so
        overlapping tiles cannot disagree about them and the scores are the rendering's own
        cell levels. On disk the renderings are written beside the sums."""
        from .models.catalogue import compartment_of, threshold_of
        from .scores import score_cells

        by_name = {t.name: t for t in plan.targets}
        markers = [by_name[l.name] for l in layers
                   if l.name in by_name and by_name[l.name].kind == "marker"]
        source = _Normalised(sums.source.sum, sums.weight.sum)
        maps, outs = [], []
        blended = {l.name: l.data for l in layers}
        for target in markers:
            if sums.on_disk:
                import zarr

                chunk = sums.weight.sum.chunks[0]
                outs.append(zarr.create_array(sums.workdir / f"{ihc_name(target.name)}.zarr",
                                              shape=plan.out_shape + (3,), chunks=(chunk, chunk, 3),
                                              dtype="u1", fill_value=255))
                values = _Normalised(sums.outputs[target.name].sum, sums.weight.sum)
            else:
                outs.append(np.empty(plan.out_shape + (3,), dtype=np.uint8))
                values = blended[target.name]
            maps.append(MarkerMap(target.name, values, compartment_of(target), threshold_of(target)))
        x0, y0 = plan.box[0], plan.box[1]
        keep = None
        if plan.polygon is not None:  # a box's cells are all in it
            import shapely

            region = region_geometry(plan.polygon, plan.holes)

            def keep(xy: np.ndarray) -> np.ndarray:  # image pixel-edge (x, y) -> level 0
                return shapely.contains_xy(region, x0 + xy[:, 0] * plan.factor,
                                           y0 + xy[:, 1] * plan.factor)

        rendered, cells = render_ihc_cells(source if sums.on_disk else source[:, :], maps,
                                           plan.out_mpp, outs, keep=keep)
        cells = cells.placed(plan.factor, (x0, y0))
        renderings = {m.name: (m, data) for m, data in zip(maps, rendered)}
        out = []
        for layer in layers:
            out.append(layer)
            if layer.name not in renderings:
                continue
            m, data = renderings[layer.name]
            if sums.on_disk:
                import dask.array as da

                data = da.from_zarr(data)
            meta = {"target": ihc_name(m.name), "model_mpp": float(self.pipeline.mpp),
                    "rendered_from": (
                        f"predicted {m.name} intensity, rendered as DAB on the source "
                        "hematoxylin (Beer-Lambert); not a measured stain"),
                    "rendering": {"compartment": m.compartment, "positivity_threshold": m.threshold,
                                  "cells": "nuclei and cells segmented in the source H&E (mupd.cells)"}}
            out.append(OutputLayer(ihc_name(m.name), "rgb", data, "gray", meta))
        return out, score_cells(cells, markers), cells


class _Normalised:
    """The blended value of a sum (numpy or zarr) over the weights, read slice by slice: RGB sums
    give uint8, marker sums float32 in [0, 1], exactly as the output layers are normalised."""

    def __init__(self, total: Any, weight: Any) -> None:
        self.total, self.weight = total, weight
        self.shape = tuple(total.shape)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        s, w = np.asarray(self.total[index]), np.asarray(self.weight[index])
        if s.ndim == 3:
            return (s / w[..., None]).clip(0, 255).round().astype(np.uint8)
        return (s / w).clip(0, 1).astype(np.float32)


def region_geometry(polygon: Sequence[tuple[float, float]],
                    holes: Sequence[Sequence[tuple[float, float]]] = ()) -> Any:
    """A region's polygon less its holes, as one valid shapely geometry (level-0 pixels)."""
    from shapely.geometry import Polygon

    return Polygon(polygon, [list(h) for h in holes]).buffer(0)


def _tiles_outside(region: Any, origins: list[tuple[int, int]], tile: int, x0: int, y0: int,
                   factor: float) -> frozenset:
    """Origins of tiles whose footprint misses the region (`region_geometry`, level-0 pixels)."""
    from shapely.geometry import box

    def footprint(oy: int, ox: int) -> Any:
        return box(x0 + ox * factor, y0 + oy * factor, x0 + (ox + tile) * factor, y0 + (oy + tile) * factor)

    return frozenset((oy, ox) for oy, ox in origins if not region.intersects(footprint(oy, ox)))


def _batched(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _crop(value: np.ndarray, oy: int, ox: int, out_h: int, out_w: int) -> np.ndarray:
    """The part of a tile that falls inside the output (tiles are never larger than needed)."""
    return value[: out_h - oy, : out_w - ox]


def _background(shape: tuple[int, ...], tile: int) -> np.ndarray:
    """What a skipped (non-tissue) tile contributes: white for RGB, zero marker intensity."""
    if len(shape) == 3:
        return np.full((tile, tile, 3), 255.0, dtype=np.float32)
    return np.zeros((tile, tile), dtype=np.float32)


def _pick_level(slide: Any, factor: float) -> tuple[Any, float, float]:
    """(level array, x downsample, y downsample) of the coarsest level still finer than `factor`.

    Opened slides (mupd.io.Slide) and ArraySlide expose `levels` ((Y, X, C) arrays, lazy for
    files); anything else that only has `read_region` (a test double) is read at level 0.
    """
    levels = getattr(slide, "levels", None)
    W, H = slide.dimensions
    if not levels:
        return None, 1.0, 1.0
    best = 0
    for i, lv in enumerate(levels):
        if (W / lv.shape[1] + H / lv.shape[0]) / 2 <= factor * (1 + 1e-3):
            best = i
    lv = levels[best]
    return lv, W / lv.shape[1], H / lv.shape[0]


def _read_tile(slide: Any, x: float, y: float, tile: int, factor: float) -> np.ndarray:
    """A tile x tile RGB tile at the model's mpp whose corner is level-0 edge point (x, y).

    Output pixel (r, c) is the area sample centred on level-0 edge point
    (x + (c + 0.5) * factor, y + (r + 0.5) * factor): exactly the grid `placement` describes, so
    overlays register to the slide to well under a level-0 pixel. Read from the coarsest pyramid
    level that is still finer than the model's mpp by the one resampler (`mupd.io.resample`,
    which also cuts the training tiles); off-slide is white.
    """
    return _read_box(slide, x, y, tile, tile, factor)


def _read_box(slide: Any, x: float, y: float, out_w: int, out_h: int, factor: float) -> np.ndarray:
    """(out_h, out_w, 3) uint8 on `_read_tile`'s grid (any size, e.g. a region's preview)."""
    level, dsx, dsy = _pick_level(slide, factor)
    return resample_window(lambda x0, y0, x1, y1: _read_window(slide, level, x0, y0, x1, y1),
                           x / dsx, y / dsy, out_w, out_h, factor / dsx, factor / dsy)


def _read_window(slide: Any, level: Any, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
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


def layer_file_stem(name: str) -> str:
    """A file name for a layer ("H&E" -> "HandE", "IHC-HER2" stays)."""
    return name.replace("&", "and").replace("/", "_")


def write_translation(result: RegionTranslation, out_dir: str | Path, source: str = "",
                      overwrite: bool = False, ome_tiff: bool = False,
                      extra_files: Optional[dict[str, str]] = None) -> Path:
    """One OME-Zarr per output layer under `out_dir` (and an OME-TIFF each when `ome_tiff`),
    plus the region's predicted scores when there are (`scores.csv`, `scores-<marker>.geojson`).

    Written into a temporary sibling folder renamed onto `out_dir` at the end, so a failure
    leaves nothing under the final name. Disk-backed layers are re-pointed at the written
    OME-Zarr (lazily) and their temporary sums removed, so `result` stays usable.
    `extra_files` (name -> text) go into the same folder before the rename, so they appear
    together with the layers or not at all (a cohort's summary row: `mupd.cohort`).
    """
    from .io import write_ome_tiff, write_ome_zarr
    from .io.omezarr import set_ngff_translation
    from .io.atomic import atomic_output

    out = check_output_folder(out_dir, overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for us holds nothing to protect
    with atomic_output(out, overwrite) as tmp:
        tmp.mkdir()
        for layer in result.layers:
            rgb = layer.kind == "rgb"
            image = layer.data if rgb else layer.data[..., None]
            meta = dict(layer.metadata)
            meta.update(source_slide=str(source), source_box_level0_xywh=list(result.box),
                        scale_um_yx=list(result.scale_um), translate_um_yx=list(result.translate_um))
            options = dict(mpp=result.output_mpp, channel_names=["R", "G", "B"] if rgb else [layer.name],
                           colors=None if rgb else [colormap_hex(layer.colormap)], metadata=meta)
            stem = layer_file_stem(layer.name)
            write_ome_zarr(tmp / f"{stem}.ome.zarr", image, **options)
            set_ngff_translation(tmp / f"{stem}.ome.zarr", result.translate_um, result.output_mpp)
            if ome_tiff:
                write_ome_tiff(tmp / f"{stem}.ome.tif", image, **options)
        if result.scores:  # scores.csv + a QuPath GeoJSON per marker: regions, cells, scores
            from .scores import ScoredRegion, write_score_files

            write_score_files(tmp, [ScoredRegion(result.annotation(out.name), result.scores,
                                                 result.cells)])
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    if result.workdir is not None:
        from .io import open_slide

        for layer in result.layers:
            level0 = open_slide(out / f"{layer_file_stem(layer.name)}.ome.zarr").levels[0]
            layer.data = level0 if layer.kind == "rgb" else level0[..., 0]
        result.close()
    return out


def check_output_folder(out_dir: str | Path, overwrite: bool = False,
                        remedy: str = "choose another output folder") -> Path:
    """Refuse (before any work) an output folder that exists with content, unless `overwrite`,
    or that cannot be made (a file on its way); `remedy` says what the caller's user can do."""
    from .errors import OutputExistsError

    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == out else f"lies under {blocker}, which is a file"
        raise OutputExistsError(f"output {out} {where}, not a folder; {remedy}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; {remedy}")
    return out
