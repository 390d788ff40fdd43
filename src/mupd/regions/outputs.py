"""What a translated region produces, and the one writer that puts it on disk.

A `StainLayer` is one output image with its `Placement` over the source slide: the same object
comes out of the translator, travels in engine results (in process and over HTTP) and is
written by `write_layers`, whichever engine ran it; the plugin turns it into a napari layer
(`napari_mupd._results`). Neutral on purpose: no torch, so the engine API can hold it.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..colors import colormap_hex
from ..scores import CellReadout, MarkerScore
from .plan import Placement, RegionPlan


@dataclass
class StainLayer:
    """One translated stain over the region, placed over the source slide."""

    name: str
    kind: str  # "rgb" (H, W, 3) uint8 or "marker" (H, W) float32 in [0, 1]
    data: Any  # numpy array, or a dask array backed by the output store for large regions
    placement: Placement
    colormap: str = "gray"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegionTranslation:
    """The translator's result: the layers of the planned `region`, and how the run went."""

    layers: list[StainLayer]
    region: RegionPlan
    n_tiles: int
    n_skipped: int
    seconds: float
    #: Disk-backed sums the (lazy) layers still read; None when the layers are in memory.
    workdir: Optional[Path] = None
    #: Per-marker read-outs over the region's cells (`mupd.scores`), and the cells; only when
    #: marker maps were rendered as IHC (the cells are the renderer's).
    scores: list[MarkerScore] = field(default_factory=list)
    cells: Optional[CellReadout] = None

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


def layer_file_stem(name: str) -> str:
    """A file name for a layer ("H&E" -> "HandE", "IHC-HER2" stays)."""
    return name.replace("&", "and").replace("/", "_")


def write_layers(layers: Sequence[StainLayer], out_dir: str | Path, source: str = "",
                 annotation: Any = None, scores: Sequence[MarkerScore] = (),
                 cells: Optional[CellReadout] = None, overwrite: bool = False,
                 ome_tiff: bool = False, extra_files: Optional[dict[str, str]] = None) -> Path:
    """One OME-Zarr per layer under `out_dir`, placed as the layer says (and an OME-TIFF each
    when `ome_tiff`), plus the region's predicted scores when there are (`scores.csv`,
    `scores-<marker>.geojson`, for `annotation`: the region as a `mupd.io.Region`, named after
    the folder).

    Written into a temporary sibling folder renamed onto `out_dir` at the end, so a failure
    leaves nothing under the final name. `extra_files` (name -> text) go into the same folder
    before the rename, so they appear together with the layers or not at all (a cohort's
    summary row: `mupd.cohort`).
    """
    from ..io import write_ome_tiff, write_ome_zarr
    from ..io.omezarr import set_ngff_translation
    from ..io.atomic import atomic_output

    out = check_output_folder(out_dir, overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for us holds nothing to protect
    with atomic_output(out, overwrite) as tmp:
        tmp.mkdir()
        for layer in layers:
            rgb, where = layer.kind == "rgb", layer.placement
            image = layer.data if rgb else layer.data[..., None]
            meta = dict(layer.metadata)
            meta.update(source_slide=str(source), source_box_level0_xywh=list(where.box),
                        scale_um_yx=list(where.scale_um), translate_um_yx=list(where.translate_um))
            options = dict(mpp=where.mpp, channel_names=["R", "G", "B"] if rgb else [layer.name],
                           colors=None if rgb else [colormap_hex(layer.colormap)], metadata=meta)
            stem = layer_file_stem(layer.name)
            write_ome_zarr(tmp / f"{stem}.ome.zarr", image, **options)
            set_ngff_translation(tmp / f"{stem}.ome.zarr", where.translate_um, where.mpp)
            if ome_tiff:
                write_ome_tiff(tmp / f"{stem}.ome.tif", image, **options)
        if scores:  # scores.csv + a QuPath GeoJSON per marker: regions, cells, scores
            from ..scores import ScoredRegion, write_score_files

            write_score_files(tmp, [ScoredRegion(dataclasses.replace(annotation, name=out.name),
                                                 list(scores), cells)])
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def write_translation(result: RegionTranslation, out_dir: str | Path, source: str = "",
                      overwrite: bool = False, ome_tiff: bool = False,
                      extra_files: Optional[dict[str, str]] = None) -> Path:
    """`write_layers` of a translator's result. Disk-backed layers are then re-pointed at the
    written OME-Zarr (lazily) and their temporary sums removed, so `result` stays usable."""
    out = write_layers(result.layers, out_dir, source=source, annotation=result.region.annotation(),
                       scores=result.scores, cells=result.cells, overwrite=overwrite,
                       ome_tiff=ome_tiff, extra_files=extra_files)
    if result.workdir is not None:
        from ..io import open_slide

        for layer in result.layers:
            level0 = open_slide(out / f"{layer_file_stem(layer.name)}.ome.zarr").levels[0]
            layer.data = level0 if layer.kind == "rgb" else level0[..., 0]
        result.close()
    return out


def check_output_folder(out_dir: str | Path, overwrite: bool = False,
                        remedy: str = "choose another output folder") -> Path:
    """Refuse (before any work) an output folder that exists with content, unless `overwrite`,
    or that cannot be made (a file on its way); `remedy` says what the caller's user can do."""
    from ..errors import OutputExistsError

    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == out else f"lies under {blocker}, which is a file"
        raise OutputExistsError(f"output {out} {where}, not a folder; {remedy}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists and is not empty; {remedy}")
    return out
