"""napari reader: any slide `mupd.io.open_slide` understands, as lazy calibrated layers, and
QuPath GeoJSON annotations as a Shapes layer placed on the open slide.

That is the TIFF family (SVS, NDPI, SCN, OME-TIFF, QPTIFF), OpenSlide's MRXS, BIF, VMS/VMU and
Philips TIFF, DICOM WSI (a folder, one .dcm in it, or all of its .dcm files selected together),
OME-Zarr and plain images.

RGB slides become one multiscale RGB layer; fluorescence slides one additive layer per channel.
Scales are micrometres per pixel so that the scale bar, ROIs and engine results line up. Nothing
is decoded here: the layers hold the slide's dask levels and napari reads tiles as it draws.

A `.geojson` file (parsed by `mupd.io.read_geojson`: annotations only, cells and other
detections skipped) becomes one Shapes layer whose data are the outlines' level-0 pixels and
whose scale and translate are the slide layer's (the active one, else the top-most), so the
shapes sit on the slide exactly. Each shape keeps its annotation's name, class, QuPath feature
id and holes as layer features, and its class colour as edge colour. napari shapes have no
holes: the outline is the shape and the holes (level-0 (x, y) rings, JSON) stay in the
`holes` feature, which the writer saves back and the Translate panel sends with the region.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ._channel_colors import channel_colormap

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
LayerData = tuple[Any, dict, str]
ReaderFunction = Callable[[PathLike], list[LayerData]]


#: Edge colour of an annotation without a class (RGBA).
UNCLASSIFIED_COLOR = (1.0, 1.0, 0.0, 1.0)
#: Edge width of annotation outlines, in micrometres on the slide.
EDGE_UM = 2.0


def napari_get_reader(path: Union[PathLike, list[PathLike]]) -> Optional[ReaderFunction]:
    """The reader for `path` if it opens as a slide or is GeoJSON, else None (napari then tries
    other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1 and not _one_dicom_slide(path):
            log.info("napari-mupd opens one slide at a time, not a stack of %d files", len(path))
            return None
        path = path[0]  # a DICOM instance opens its whole folder
    if str(path).lower().endswith(".geojson"):
        return read_annotations
    from mupd.errors import MuPDError
    from mupd.io import open_slide

    with warnings.catch_warnings(record=True) as caught:  # re-said below as a notification
        warnings.simplefilter("always", UserWarning)
        try:
            slide = open_slide(path)
        except MuPDError as exc:
            log.info("napari-mupd cannot open %s: %s", path, exc)
            return None
    for w in caught:
        if "mpp" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def read(_path: PathLike) -> list[LayerData]:
        return slide_layer_data(slide)

    return read


def read_annotations(path: PathLike) -> list[LayerData]:
    """A QuPath GeoJSON as a Shapes layer on the current viewer's slide (see the module doc)."""
    from mupd.io import read_geojson

    from ._regions import current_slide_layer

    slide = current_slide_layer()
    if slide is None:
        from napari.utils.notifications import show_warning

        show_warning(f"{Path(path).name}: no slide is open, so its annotations are shown in level-0 "
                     "pixels; open the slide first to place them on it")
    return [annotation_layer_data(read_geojson(path), slide, Path(path).stem)]


def annotation_layer_data(regions: list, slide_layer: Any = None, name: str = "annotations") -> LayerData:
    """Shapes layer data of `mupd.io.Region`s: level-0 (y, x) vertices placed with the slide
    layer's scale and translate (pixel units without a slide)."""
    import json

    data, types, colors = [], [], []
    for r in regions:
        yx = np.asarray(r.polygon, dtype=float)[:, ::-1]
        if r.shape == "ellipse":  # napari ellipses are their bounding box, as QuPath's are
            (y0, x0), (y1, x1) = yx.min(axis=0), yx.max(axis=0)
            yx = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
        data.append(yx)
        types.append(r.shape)
        colors.append(tuple(c / 255 for c in r.color) + (1.0,) if r.color else UNCLASSIFIED_COLOR)
    features = {"name": [r.name for r in regions],
                "classification": [r.classification for r in regions],
                "id": [r.id for r in regions],
                "holes": [json.dumps([[list(p) for p in h] for h in r.holes]) for r in regions]}
    meta: dict[str, Any] = {"name": name, "shape_type": types, "edge_color": colors or "yellow",
                            "face_color": "transparent", "features": features}
    if slide_layer is not None:
        scale = tuple(float(v) for v in slide_layer.scale[-2:])
        translate = tuple(float(v) for v in slide_layer.translate[-2:])
        meta.update(scale=scale, translate=translate, units=tuple(slide_layer.units[-2:]),
                    edge_width=EDGE_UM / scale[0] if slide_layer.metadata.get("mpp") else 2.0,
                    metadata={"mpp": slide_layer.metadata.get("mpp"), "level0_origin_um": translate,
                              "slide_path": slide_layer.metadata.get("slide_path")})
    else:
        meta["edge_width"] = 2.0
    return data, meta, "shapes"


def _one_dicom_slide(paths: list[PathLike]) -> bool:
    """True when `paths` are DICOM instance files of one folder (the levels of one DICOM slide)."""
    from mupd.io.dicom import DICOM_SUFFIXES

    files = [Path(p) for p in paths]
    return (len({f.parent for f in files}) == 1
            and all(f.suffix.lower() in DICOM_SUFFIXES and f.is_file() for f in files))


def slide_layer_data(slide) -> list[LayerData]:
    """Layer-data tuples for an opened `mupd.io.Slide` (also used by the sample data and the demo)."""
    calibrated = slide.mpp_known
    scale = (slide.mpp[1], slide.mpp[0]) if calibrated else (1.0, 1.0)
    units = ("um", "um") if calibrated else ("pixel", "pixel")
    if not calibrated:
        _notify_uncalibrated(slide.path)
    common = {"scale": scale, "units": units}
    if calibrated and slide.origin_um is not None:  # e.g. a saved virtual stain, over its slide
        common["translate"] = tuple(slide.origin_um)
    meta = slide_metadata(slide)
    multiscale = len(slide.levels) > 1
    stem = _display_name(slide.path)
    if slide.is_rgb:
        data = slide.levels if multiscale else slide.levels[0]
        return [(data, {**common, "name": stem, "rgb": True, "multiscale": multiscale,
                        "metadata": meta}, "image")]
    limits = _contrast_limits(slide.levels)
    layers = []
    for i, (name, color) in enumerate(zip(slide.channel_names, slide.channel_colors)):
        planes = [lv[..., i] for lv in slide.levels]
        layers.append((planes if multiscale else planes[0], {
            **common, "name": name, "rgb": False, "multiscale": multiscale,
            "colormap": channel_colormap(name, color, i), "blending": "additive",
            "contrast_limits": limits, "metadata": {**meta, "channel": name, "channel_index": i},
        }, "image"))
    return layers


def slide_metadata(slide) -> dict:
    """What a layer keeps about its slide: enough for widgets to send level-0 ROIs to the engine."""
    return {
        "slide_path": str(slide.path),
        "format": slide.format,
        "mpp": tuple(slide.mpp) if slide.mpp_known else None,
        "mpp_known": slide.mpp_known,
        "level_dimensions": [tuple(d) for d in slide.level_dimensions],
        "channel_names": list(slide.channel_names),
    }


def _display_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _contrast_limits(levels) -> tuple[float, float]:
    """Integer channels span their dtype; float ones the range of the coarsest (smallest) level."""
    dtype = levels[0].dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    lo, hi = (float(v) for v in (levels[-1].min().compute(), levels[-1].max().compute()))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _notify_uncalibrated(path: Path) -> None:
    from napari.utils.notifications import show_warning

    show_warning(f"{path.name} has no pixel size (mpp) in its metadata: it is shown in pixels "
                 "(scale 1), so the scale bar and any micrometre measurement are unavailable.")
