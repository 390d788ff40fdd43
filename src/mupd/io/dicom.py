"""DICOM whole-slide images (VL Whole Slide Microscopy, one instance file per level) via wsidicom.

A DICOM slide is a folder of instances, so a folder or any one .dcm in it opens the folder (files
without a suffix are recognised by their DICM preamble). Brightfield (3 samples per pixel) is one
RGB image; fluorescence is one monochrome instance per optical path, read as one channel each,
named from the optical path's description or identifier. Labels and overviews come out as the
'label' and 'macro' associated images, as OpenSlide and tiffslide name them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import SlideError
from .slide import MppLike, Slide, check_level_size, lazy_level

DICOM_SUFFIXES = {".dcm", ".dicom"}
#: A folder is taken as DICOM when one of its first this many files has the DICM preamble.
MAX_SNIFFED_FILES = 64


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM Part 10 preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_folder(path: Path) -> bool:
    files = (e for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))
    return any(is_dicom_file(Path(e.path)) for _, e in zip(range(MAX_SNIFFED_FILES), files))


def open_dicom(path: Path, mpp: MppLike = None) -> Slide:
    """Open the DICOM WSI in folder `path` (or in the folder of the instance file `path`)."""
    from wsidicom import WsiDicom

    folder = path if path.is_dir() else path.parent
    files = _one_slide_files(folder)
    try:
        wsi = WsiDicom.open(files)
    except Exception as exc:  # no WSI instances, several slides mixed, unreadable files
        raise SlideError(f"cannot open {folder} as a DICOM whole-slide image ({type(exc).__name__}: {exc}); "
                         "the folder should hold the instance files of one slide") from exc
    try:
        return _build(wsi, folder, mpp)
    except Exception as exc:
        wsi.close()
        if isinstance(exc, SlideError):
            raise
        raise SlideError(f"cannot open {folder} as a DICOM whole-slide image ({type(exc).__name__}: {exc})") from exc


def _one_slide_files(folder: Path) -> list[Path]:
    """The folder's DICOM files; refuses volume images of several series (slides), which wsidicom
    would otherwise mix into one pyramid."""
    import pydicom

    files, series = [], set()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not entry.is_file() or not is_dicom_file(path):
            continue
        files.append(path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "ImageType"])
        except Exception:  # unreadable header: wsidicom reports it, or skips a non-image object
            continue
        if "VOLUME" in list(ds.get("ImageType", [])):
            series.add((ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")))
    if len(series) > 1:
        raise SlideError(f"{folder} holds the DICOM images of {len(series)} slides (series); put each slide's "
                         "files in a folder of its own")
    return files


def _build(wsi, folder: Path, user_mpp: MppLike) -> Slide:
    base = wsi.levels.base_level
    image = base.default_instance.image_data
    samples, bits = int(image.samples_per_pixel), int(image.bits)
    dtype = np.dtype(np.uint8 if bits <= 8 else np.uint16)
    if samples == 3:
        paths = [base.default_instance.default_path]
        names, colors, is_rgb = ["R", "G", "B"], ["FF0000", "00FF00", "0000FF"], dtype == np.uint8
    elif samples == 1:
        paths = _optical_paths(wsi, base)
        names, colors, is_rgb = _channel_names(wsi, paths), [None] * len(paths), False
    else:
        raise SlideError(f"{folder}: DICOM images of {samples} samples per pixel are not supported (1 or 3)")
    n_channels = 3 if samples == 3 else len(paths)
    data_bytes = sum(os.path.getsize(f) for f in (wsi.files or []))
    levels, readers = [], []
    lock = threading.Lock()
    for i, level in enumerate(wsi.levels.levels):
        shape = (level.size.height, level.size.width, n_channels)
        tile = (level.tile_size.height, level.tile_size.width)
        check_level_size(folder, i, shape, (*tile, n_channels), dtype, data_bytes or None)
        read = _reader(wsi, level.level, paths, samples, dtype, lock)
        levels.append(lazy_level(read, shape, tile, dtype))
        readers.append(read)
    mpp = base.mpp  # SizeMm named so by wsidicom, in um
    file_mpp = (float(mpp.width), float(mpp.height)) if mpp is not None else None
    return Slide(folder, "dicom", levels, readers, names, is_rgb, file_mpp=file_mpp, user_mpp=user_mpp,
                 objective_power=_objective_power(wsi), associated_images=_associated(wsi),
                 channel_colors=colors, close=wsi.close)


def _reader(wsi, level: int, paths: list[str], samples: int, dtype: np.dtype, lock: threading.Lock):
    """Reads one slide's regions one at a time: wsidicom 0.36.1 read from several threads at once
    (dask's) was seen to return other tiles' pixels for whole tile rows, and to keep doing so for
    that open slide (about 1 open in 5 in our tests), though the files were right."""
    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        size = (x1 - x0, y1 - y0)
        with lock:
            planes = [np.asarray(wsi.read_region((x0, y0), level, size, path=p, as_array=True)) for p in paths]
        if samples == 3:
            return planes[0][..., :3].astype(dtype, copy=False)
        return np.stack([p.reshape(size[1], size[0]) for p in planes], axis=-1).astype(dtype, copy=False)

    return read


def _optical_paths(wsi, base) -> list[str]:
    """The base level's optical paths in the file's order (wsidicom gives them as a set)."""
    present = set(base.optical_paths)
    listed = [p.identifier for p in (wsi.metadata.pyramid.optical_paths or []) if p.identifier in present]
    return listed + sorted(present - set(listed))


def _channel_names(wsi, paths: list[str]) -> list[str]:
    described = {p.identifier: p.description for p in (wsi.metadata.pyramid.optical_paths or [])}
    return [described.get(p) or str(p) for p in paths]


def _objective_power(wsi) -> Optional[float]:
    for path in wsi.metadata.pyramid.optical_paths or []:
        power = getattr(path.objective, "objective_power", None) if path.objective else None
        if power:
            return float(power)
    return None


def _associated(wsi) -> dict[str, np.ndarray]:
    images = {}
    for name, read, present in (("label", wsi.read_label, wsi.labels), ("macro", wsi.read_overview, wsi.overviews)):
        if not present:
            continue
        try:
            images[name] = np.asarray(read(as_array=True))
        except Exception:  # a broken label/overview must not stop the slide from opening
            continue
    return images
