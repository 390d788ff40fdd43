"""ROI and whole-slide translation: a pipeline run over a planned region, tile by tile.

The slide is read tile by tile at the model's working magnification (`regions.source`),
background tiles are skipped, and the overlapping outputs are blended without seams
(`regions.blend`). Tiles cut their starting noise from one noise field over the region
(`translate(positions=...)`): a diffusion model's output follows its noise, so with a draw per
tile neighbours would predict different things where they overlap. The steps (`plan`,
`new_sums`, `accumulate`, `finish`) are separate so that a distributed run can share a
region's batches out; the result's layers are placed over the source slide
(`regions.outputs`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..data.sections import footprint_mask
from ..errors import RegionError, SlideError
from ..names import ihc_name
from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from ..render import IhcLook, MarkerMap, render_ihc_cells
from ..scores import CellReadout, MarkerScore
from .blend import Normalised, RegionSums, feather_window, level_window
from .outputs import RegionTranslation, StainLayer
from .plan import RegionPlan, SlideGeometry, TileSpec, plan_region, region_geometry
from .source import read_box, read_tile

#: Long side (px) of the region preview a stain normalisation is estimated on.
PREVIEW_SIDE = 1024


@dataclass
class TranslationPlan:
    """Everything fixed before any tile runs: every process of a distributed run derives the
    same plan, so a rank can process any subset of its batches."""

    region: RegionPlan
    slide_path: str
    targets: list[Any]
    batches: list[list[tuple[int, int]]]  # tile origins (output pixels), in batch_size groups
    #: fitted once on a preview of the whole region, applied to every tile (mupd.stain_norm)
    stain_norm: Optional[Any] = None
    #: a lab's IHC the DAB rendering matches (mupd.render.IhcLook; None: the defaults)
    ihc_look: Optional[IhcLook] = None

    @property
    def n_tiles(self) -> int:
        return sum(len(b) for b in self.batches)


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
        ihc_look: Optional[IhcLook] = None,
    ) -> RegionTranslation:
        start = time.perf_counter()
        if strength is not None:  # refused before any tile is read
            from ..pipeline import check_image_to_image

            check_image_to_image([self.pipeline.catalogue.get(s) for s in stains], strength)
        plan = self.plan(slide, stains, box=box, polygon=polygon, holes=holes, stain_norm=stain_norm,
                         stain_reference=stain_reference, ihc_look=ihc_look)
        sums = self.new_sums(plan, render_brightfield, workdir)
        try:
            self.accumulate(slide, plan, plan.batches, sums, steps=steps, guidance=guidance,
                            seed=seed, render_brightfield=render_brightfield,
                            progress=progress, cancel=cancel, strength=strength, prompt=prompt)
            return self.finish(plan, sums, start)
        except BaseException:
            shutil.rmtree(sums.workdir, ignore_errors=True)
            raise

    @property
    def tiles(self) -> TileSpec:
        """The pipeline's tiles, as the region plan takes them."""
        return TileSpec(int(self.pipeline.tile_size), float(self.pipeline.mpp), self.overlap, self.step)

    def plan(self, slide: Any, stains: Sequence[str],
             box: Optional[tuple[int, int, int, int]] = None,
             polygon: Optional[Sequence[tuple[float, float]]] = None,
             holes: Sequence[Sequence[tuple[float, float]]] = (),
             stain_norm: Optional[str] = None,
             stain_reference: Optional[str | Path] = None,
             ihc_look: Optional[IhcLook] = None) -> TranslationPlan:
        """Targets, tiles and batches of a region (`plan_region`: a box, or a polygon less its
        `holes`). `stain_norm` (macenko / reinhard): the region's stain, estimated once on a
        preview of it, is mapped onto `stain_reference` (default: the training data's) in
        every tile. `ihc_look`: the lab's IHC the marker renderings match."""
        from ..stain_norm import check_method, fit_normalization

        stain_norm = check_method(stain_norm)
        targets = [self.pipeline.catalogue.get(s) for s in stains]  # unknown stain -> clear error
        if not targets:
            raise RegionError("no target stain given: name at least one stain or marker")
        if slide.mpp is None:
            raise SlideError(
                f"{slide.path}: the slide has no microns-per-pixel value; give one (e.g. --mpp 0.5)"
            )
        region = plan_region(SlideGeometry.of(slide), self.tiles, box, polygon, holes)
        if getattr(slide, "is_rgb", True) is False:
            raise SlideError(f"{slide.path}: translation needs an RGB brightfield (H&E) slide; this one "
                             f"has channels {getattr(slide, 'channel_names', '?')}")
        normalization = None
        if stain_norm is not None:
            x0, y0, w, h = region.box
            f = max(region.factor, max(w, h) / PREVIEW_SIDE)
            preview = read_box(slide, x0, y0, max(1, round(w / f)), max(1, round(h / f)), f)
            normalization = fit_normalization(stain_norm, preview, stain_reference,
                                              f"region {region.box} of {slide.path}")
        return TranslationPlan(region, str(slide.path), targets,
                               list(_batched(region.origins, self.batch_size)), normalization, ihc_look)

    def new_sums(self, plan: TranslationPlan, render_brightfield: bool,
                 workdir: Optional[Path] = None) -> RegionSums:
        render = render_brightfield and any(t.kind == "marker" for t in plan.targets)
        return RegionSums.create(plan.region.out_shape, {t.name: t.kind == "rgb" for t in plan.targets},
                                 render, chunk=max(self.pipeline.tile_size, 256),  # a tile: <= 4 chunks
                                 workdir=workdir)

    def accumulate(
        self,
        slide: Any,
        plan: TranslationPlan,
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
        region = plan.region
        window = feather_window(T, min(self.overlap, T // 2))
        margin, tent = level_window(T, T - self.overlap)
        footprint = footprint_mask(T, float(self.pipeline.mpp))
        x0, y0, f = region.box[0], region.box[1], region.factor
        total = sum(len(b) for b in batches)
        done = 0
        progress(ProgressEvent("tiles", 0, total, "translating"))
        for batch in batches:
            if cancel is not None:
                cancel.raise_if_cancelled()
            inside = np.array([o not in region.outside for o in batch], dtype=bool)
            tiles = np.stack([
                read_tile(slide, x0 + ox * f, y0 + oy * f, T, f)
                if ins else np.full((T, T, 3), 255, dtype=np.uint8)
                for (oy, ox), ins in zip(batch, inside)
            ])
            if plan.stain_norm is not None:  # the same fitted map on every tile: no seams
                tiles[inside] = plan.stain_norm(tiles[inside])
            keep = inside.copy()
            keep[inside] = self._tissue_mask(tiles[inside])
            sums.n_skipped += int((~keep).sum())
            sums.weight.add([(oy, ox, window) for oy, ox in batch])
            if sums.level_weight is not None:
                sums.level_weight.add([(oy - margin, ox - margin, tent) for oy, ox in batch])
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
                blended, levels = [], []
                for i, (oy, ox) in enumerate(batch):
                    if keep[i]:
                        value = outputs[name][kept_index[i]].astype(np.float32)
                    elif strength is not None:  # image-to-image: glass stays the source's glass
                        value = tiles[i].astype(np.float32)
                    else:
                        value = _background(a.sum.shape, T)
                    if name in sums.levels:  # a marker: its tile level blends apart
                        level = float(value[footprint].mean())
                        levels.append((oy - margin, ox - margin, level * tent))
                        value = value - level
                    win = window if value.ndim == 2 else window[..., None]
                    blended.append((oy, ox, value * win))
                a.add(blended)
                if levels:
                    sums.levels[name].add(levels)
            if sums.source is not None:  # the source as read (identical where tiles overlap)
                sums.source.add([(oy, ox, tiles[i].astype(np.float32) * window[..., None])
                                 for i, (oy, ox) in enumerate(batch)])
            done += len(batch)
            progress(ProgressEvent("tiles", done, total, f"{done}/{total} tiles"))

    def finish(self, plan: TranslationPlan, sums: RegionSums, start: float) -> RegionTranslation:
        """Normalise the (complete) sums into output layers placed over the slide."""
        layers = self._layers(plan, sums)
        scores, cells = [], None
        if sums.source is not None:
            layers, scores, cells = self._with_ihc(plan, layers, sums)
        if not sums.on_disk:
            shutil.rmtree(sums.workdir, ignore_errors=True)
        return RegionTranslation(
            layers=layers, region=plan.region, n_tiles=plan.n_tiles, n_skipped=sums.n_skipped,
            seconds=time.perf_counter() - start, workdir=sums.workdir if sums.on_disk else None,
            scores=scores, cells=cells,
        )

    def _tissue_mask(self, tiles: np.ndarray) -> np.ndarray:
        if not self.tissue_only:
            return np.ones(len(tiles), dtype=bool)
        from ..data.tissue import is_tissue

        return np.array([is_tissue(t) for t in tiles], dtype=bool)

    def _layers(self, plan: TranslationPlan, sums: RegionSums) -> list[StainLayer]:
        by_name = {t.name: t for t in plan.targets}
        placement = plan.region.placement
        layers = []
        for name in sums.outputs:
            target = by_name.get(name)
            meta = {"target": name, "model_mpp": float(self.pipeline.mpp)}
            if plan.stain_norm is not None:
                meta["stain_normalization"] = plan.stain_norm.to_dict()
            layers.append(StainLayer(name, target.kind, sums.blended(name, lazy=sums.on_disk), placement,
                                     getattr(target, "colormap", "gray") or "gray", meta))
        return layers

    def _with_ihc(self, plan: TranslationPlan, layers: list[StainLayer], sums: RegionSums
                  ) -> tuple[list[StainLayer], list[MarkerScore], CellReadout]:
        """Each marker layer followed by its rendering as DAB IHC on the blended source H&E,
        and the read-out of every marker over the region's cells (`mupd.scores`): cells
        segmented once over the region (in windows for a large one) for all markers, so
        overlapping tiles cannot disagree about them and the scores are the rendering's own
        cell levels. On disk the renderings are written beside the sums."""
        from ..models.catalogue import compartment_of, threshold_of
        from ..scores import score_cells

        region = plan.region
        by_name = {t.name: t for t in plan.targets}
        markers = [by_name[l.name] for l in layers
                   if l.name in by_name and by_name[l.name].kind == "marker"]
        source = Normalised(sums.source.sum, sums.weight.sum)
        maps, outs = [], []
        blended = {l.name: l.data for l in layers}
        for target in markers:
            if sums.on_disk:
                import zarr

                chunk = sums.weight.sum.chunks[0]
                outs.append(zarr.create_array(sums.workdir / f"{ihc_name(target.name)}.zarr",
                                              shape=region.out_shape + (3,), chunks=(chunk, chunk, 3),
                                              dtype="u1", fill_value=255))
                values = sums.window(target.name)
            else:
                outs.append(np.empty(region.out_shape + (3,), dtype=np.uint8))
                values = blended[target.name]
            maps.append(MarkerMap(target.name, values, compartment_of(target), threshold_of(target)))
        x0, y0 = region.box[0], region.box[1]
        keep = None
        if region.polygon is not None:  # a box's cells are all in it
            import shapely

            outline = region_geometry(region.polygon, region.holes)

            def keep(xy: np.ndarray) -> np.ndarray:  # image pixel-edge (x, y) -> level 0
                return shapely.contains_xy(outline, x0 + xy[:, 0] * region.factor,
                                           y0 + xy[:, 1] * region.factor)

        rendered, cells = render_ihc_cells(source if sums.on_disk else source[:, :], maps,
                                           region.out_mpp, outs, keep=keep, look=plan.ihc_look)
        cells = cells.placed(region.factor, (x0, y0))
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
                                  "cells": "nuclei and cells segmented in the source H&E (mupd.cells)",
                                  "ihc_look": plan.ihc_look.to_dict() if plan.ihc_look else "default"}}
            out.append(StainLayer(ihc_name(m.name), "rgb", data, layer.placement, "gray", meta))
        return out, score_cells(cells, markers), cells


def _batched(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _background(shape: tuple[int, ...], tile: int) -> np.ndarray:
    """What a skipped (non-tissue) tile contributes: white for RGB, zero marker intensity."""
    if len(shape) == 3:
        return np.full((tile, tile, 3), 255.0, dtype=np.float32)
    return np.zeros((tile, tile), dtype=np.float32)
