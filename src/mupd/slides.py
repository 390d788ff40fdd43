"""ROI and whole-slide translation: tiles at the model's mpp, feathered overlaps, bounded memory.

The slide is read tile by tile at the model's working magnification, background tiles are
skipped, tiles overlap and are blended with a feathered window (weights normalised, so the
result has no seams), and the sums live in zarr arrays on disk for large regions so that a
whole section never sits in memory. The placement of every output is given in micrometres
in the source slide's frame (napari's pixel-centre convention).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from skimage.transform import resize

from .errors import RegionError, SlideError
from .progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .render import render_dab_ihc

#: Regions with more output pixels than this accumulate on disk instead of in memory.
IN_MEMORY_LIMIT_PX = 4096 * 4096


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


@dataclass(frozen=True)
class TileGrid:
    """Tile origins (in output pixels) covering an output of `height` x `width`."""

    height: int
    width: int
    tile: int
    overlap: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def _starts(self, length: int) -> list[int]:
        if length <= self.tile:
            return [0]
        n = math.ceil((length - self.tile) / self.stride) + 1
        starts = [i * self.stride for i in range(n)]
        starts[-1] = length - self.tile  # last tile flush with the edge: no padding inside the ROI
        return sorted(set(starts))

    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self._starts(self.height) for x in self._starts(self.width)]


class ArraySlide:
    """An RGB region already in memory (an upload to the server, a test image), read like a slide.

    It offers what RegionTranslator reads from an opened slide: `path`, `mpp` (x, y),
    `dimensions` (width, height) and `read_region((x, y), (w, h))`.
    """

    def __init__(self, image: np.ndarray, mpp: float, path: str = "<memory>") -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise SlideError(f"{path}: expected an (H, W, 3) uint8 RGB image, got "
                             f"{image.shape} {image.dtype}")
        self.image, self.path, self.mpp = image[..., :3], path, (float(mpp), float(mpp))

    @property
    def dimensions(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])

    def read_region(self, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        (x, y), (w, h) = location, size
        return self.image[y : y + h, x : x + w]

    def __enter__(self) -> "ArraySlide":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


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

            chunks = (chunk, chunk) + tuple(shape[2:])
            self.sum = zarr.open_array(store, mode="w", shape=shape, chunks=chunks, dtype="i8")

    def add(self, y: int, x: int, value: np.ndarray) -> None:
        sl = (slice(y, y + value.shape[0]), slice(x, x + value.shape[1]))
        self.sum[sl] = self.sum[sl] + np.rint(value.astype(np.float64) * FIXED_POINT).astype(np.int64)


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

    def arrays(self) -> list[Any]:
        """Every sum array in a fixed order (for reducing across processes)."""
        return [self.outputs[k].sum for k in sorted(self.outputs)] + [self.weight.sum]


class RegionTranslator:
    """Runs a pipeline over a region of a slide; the CLI, server and plugin all use this.

    `__call__` does a whole region; `plan`, `new_sums`, `accumulate` and `finish` are its steps,
    so that a distributed run (mupd.distributed) can give each process a share of the batches.
    """

    def __init__(self, pipeline: Any, batch_size: int = 8, overlap: float = 0.25,
                 tissue_only: bool = True) -> None:
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.overlap = int(round(pipeline.tile_size * overlap))
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
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> RegionTranslation:
        start = time.perf_counter()
        plan = self.plan(slide, stains, box=box, polygon=polygon)
        sums = self.new_sums(plan, render_brightfield, workdir)
        try:
            self.accumulate(slide, plan, plan.batches, sums, steps=steps, guidance=guidance,
                            seed=seed, render_brightfield=render_brightfield,
                            progress=progress, cancel=cancel)
            return self.finish(plan, sums, start)
        except BaseException:
            shutil.rmtree(sums.workdir, ignore_errors=True)
            raise

    def plan(self, slide: Any, stains: Sequence[str],
             box: Optional[tuple[int, int, int, int]] = None,
             polygon: Optional[Sequence[tuple[float, float]]] = None) -> RegionPlan:
        targets = [self.pipeline.catalogue.get(s) for s in stains]  # unknown stain -> clear error
        if not targets:
            raise RegionError("no target stain given: name at least one stain or marker")
        if slide.mpp is None:
            raise SlideError(
                f"{slide.path}: the slide has no microns-per-pixel value; give one (e.g. --mpp 0.5)"
            )
        if polygon is not None:
            box = box_from_polygon(polygon)
        if box is None:
            box = (0, 0, *slide.dimensions)
        box = tuple(int(v) for v in box)
        check_box(box, slide.dimensions, f"slide {slide.path}")
        mpp0 = float(np.mean(slide.mpp))
        out_mpp = float(self.pipeline.mpp)
        factor = out_mpp / mpp0
        x0, y0, w, h = box
        out_h, out_w = max(1, round(h / factor)), max(1, round(w / factor))
        origins = TileGrid(out_h, out_w, self.pipeline.tile_size, self.overlap).origins()
        return RegionPlan(
            slide_path=str(slide.path), slide_mpp=tuple(slide.mpp), targets=targets, box=box,
            factor=factor, out_mpp=out_mpp, out_shape=(out_h, out_w),
            batches=list(_batched(origins, self.batch_size)),
        )

    def new_sums(self, plan: RegionPlan, render_brightfield: bool,
                 workdir: Optional[Path] = None) -> RegionSums:
        tmp = Path(tempfile.mkdtemp(prefix="mupd-acc-", dir=workdir))
        on_disk = plan.out_shape[0] * plan.out_shape[1] > IN_MEMORY_LIMIT_PX

        def make(name, extra=()):
            return _Accumulator(plan.out_shape + extra, tmp / f"{name}.zarr" if on_disk else None, 512)

        acc = {}
        for t in plan.targets:
            acc[t.name] = make(t.name, (3,) if t.kind == "rgb" else ())
            if t.kind == "marker" and render_brightfield:
                acc[f"IHC-{t.name}"] = make(f"IHC-{t.name}", (3,))
        return RegionSums(acc, make("_weight"), tmp, on_disk)

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
    ) -> None:
        """Add the blended outputs of `batches` (a subset of `plan.batches`) into `sums`."""
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
            tiles = np.stack([
                _read_tile(slide, x0 + ox * plan.factor, y0 + oy * plan.factor, T, plan.factor,
                           plan.out_mpp)
                for oy, ox in batch
            ])
            keep = self._tissue_mask(tiles)
            sums.n_skipped += int((~keep).sum())
            for oy, ox in batch:
                sums.weight.add(oy, ox, _crop(window, oy, ox, out_h, out_w))
            outputs = {}
            if keep.any():
                outputs = self.pipeline.translate(
                    tiles[keep], [t.name for t in plan.targets], steps=steps, guidance=guidance,
                    seed=seed, batch_size=self.batch_size,
                )
                if render_brightfield:
                    for t in plan.targets:
                        if t.kind == "marker":
                            outputs[f"IHC-{t.name}"] = render_dab_ihc(tiles[keep], outputs[t.name])
            kept_index = np.cumsum(keep) - 1
            for name, a in sums.outputs.items():
                for i, (oy, ox) in enumerate(batch):
                    if keep[i]:
                        value = outputs[name][kept_index[i]].astype(np.float32)
                    else:
                        value = _background(a.sum.shape, T)
                    win = window if value.ndim == 2 else window[..., None]
                    a.add(oy, ox, _crop(value * win, oy, ox, out_h, out_w))
            done += len(batch)
            progress(ProgressEvent("tiles", done, total, f"{done}/{total} tiles"))

    def finish(self, plan: RegionPlan, sums: RegionSums, start: float) -> RegionTranslation:
        """Normalise the (complete) sums into output layers placed over the slide."""
        layers = self._layers(plan.targets, sums.outputs, sums.weight, sums.on_disk, sums.workdir)
        if not sums.on_disk:
            shutil.rmtree(sums.workdir, ignore_errors=True)
        scale, translate = placement(plan.box, plan.slide_mpp, plan.out_mpp)
        return RegionTranslation(
            layers=layers, box=plan.box, output_mpp=plan.out_mpp, scale_um=scale,
            translate_um=translate, n_tiles=plan.n_tiles, n_skipped=sums.n_skipped,
            seconds=time.perf_counter() - start,
        )

    def _tissue_mask(self, tiles: np.ndarray) -> np.ndarray:
        if not self.tissue_only:
            return np.ones(len(tiles), dtype=bool)
        from .data.tissue import is_tissue

        return np.array([is_tissue(t) for t in tiles], dtype=bool)

    def _layers(self, targets, acc, weight, on_disk, tmp) -> list[OutputLayer]:
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
            if target is None:  # a brightfield rendering of a marker
                marker = name.removeprefix("IHC-")
                meta["rendered_from"] = (
                    f"predicted {marker} intensity, rendered as DAB on the source hematoxylin "
                    "(Beer-Lambert); not a measured stain"
                )
                layers.append(OutputLayer(name, "rgb", data, "gray", meta))
            else:
                layers.append(OutputLayer(name, target.kind, data, getattr(target, "colormap", "gray") or "gray", meta))
        if on_disk:
            # dask arrays still read the sums: keep them; the caller writes and then removes tmp.
            for layer in layers:
                layer.metadata["_workdir"] = str(tmp)
        return layers


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


def _read_tile(slide: Any, x: float, y: float, tile: int, factor: float, out_mpp: float) -> np.ndarray:
    """A tile x tile RGB crop at the model's mpp whose corner is level-0 (x, y); off-slide is white."""
    W, H = slide.dimensions
    size0 = tile * factor
    xa, ya = int(math.floor(x)), int(math.floor(y))
    xb, yb = int(math.ceil(x + size0)), int(math.ceil(y + size0))
    cx0, cy0, cx1, cy1 = max(xa, 0), max(ya, 0), min(xb, W), min(yb, H)
    canvas = np.full((yb - ya, xb - xa, 3), 255, dtype=np.uint8)
    if cx1 > cx0 and cy1 > cy0:
        region = slide.read_region((cx0, cy0), (cx1 - cx0, cy1 - cy0))
        canvas[cy0 - ya : cy1 - ya, cx0 - xa : cx1 - xa] = region[..., :3]
    if canvas.shape[:2] == (tile, tile):
        return canvas
    out = resize(canvas, (tile, tile), order=1, anti_aliasing=factor > 1, preserve_range=True)
    return out.round().astype(np.uint8)


def _color_hex(colormap: str) -> str:
    """OME channel colour for a napari colormap name (unknown names fall back to white)."""
    named = {"magenta": "FF00FF", "green": "00FF00", "yellow": "FFFF00", "red": "FF0000",
             "cyan": "00FFFF", "blue": "0000FF", "gray": "FFFFFF", "bop orange": "FF8000",
             "bop purple": "8000FF", "bop blue": "0080FF"}
    return named.get(colormap, "FFFFFF")


def write_translation(result: RegionTranslation, out_dir: str | Path, source: str = "",
                      overwrite: bool = False) -> Path:
    """One OME-Zarr per output layer under `out_dir`, each with its placement over the source."""
    from .errors import OutputExistsError
    from .io import write_ome_zarr

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; "
                                "choose another or pass overwrite")
    out.mkdir(parents=True, exist_ok=True)
    workdirs = set()
    for layer in result.layers:
        rgb = layer.kind == "rgb"
        image = layer.data if rgb else layer.data[..., None]
        meta = {k: v for k, v in layer.metadata.items() if not k.startswith("_")}
        meta.update(source_slide=str(source), source_box_level0_xywh=list(result.box),
                    translate_um_yx=list(result.translate_um))
        write_ome_zarr(
            out / f"{layer.name.replace('&', 'and').replace('/', '_')}.ome.zarr", image,
            mpp=result.output_mpp,
            channel_names=["R", "G", "B"] if rgb else [layer.name],
            colors=None if rgb else [_color_hex(layer.colormap)],
            overwrite=overwrite, metadata=meta,
        )
        if "_workdir" in layer.metadata:
            workdirs.add(layer.metadata["_workdir"])
    for w in workdirs:
        shutil.rmtree(w, ignore_errors=True)
    return out
