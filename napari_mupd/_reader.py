"""napari reader: any slide `mupd.io.open_slide` understands, as lazy calibrated layers.

That is the TIFF family (SVS, NDPI, SCN, OME-TIFF, QPTIFF), OpenSlide's MRXS, BIF, VMS/VMU and
Philips TIFF, DICOM WSI (a folder, one .dcm in it, or all of its .dcm files selected together),
OME-Zarr and plain images.

RGB slides become one multiscale RGB layer; fluorescence slides one additive layer per channel.
Scales are micrometres per pixel so that the scale bar, ROIs and engine results line up. Nothing
is decoded here: the layers hold the slide's dask levels and napari reads tiles as it draws.
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


def napari_get_reader(path: Union[PathLike, list[PathLike]]) -> Optional[ReaderFunction]:
    """The reader for `path` if it opens as a slide, else None (napari then tries other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1 and not _one_dicom_slide(path):
            log.info("napari-mupd opens one slide at a time, not a stack of %d files", len(path))
            return None
        path = path[0]  # a DICOM instance opens its whole folder
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
