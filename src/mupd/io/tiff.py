"""TIFF-family slides via tiffslide: Aperio SVS, generic pyramidal TIFF, OME-TIFF, PerkinElmer
QPTIFF, Hamamatsu NDPI and Leica SCN.

tiffslide gives the zarr view of the pyramid (chunks = the file's tiles) and the Aperio/OME/NDPI/
Leica properties (mpp: NDPI from its centimetre resolution tags, SCN from the nm sizes in its
XML); the OME and QPTIFF XML is parsed here for channel names, colours and pixel size. A Leica
SCN places its scanned regions on the whole-slide canvas (in nm); the canvas is level 0 here, as
in OpenSlide and QuPath, and the glass between regions reads white.
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import dask.array as da
import numpy as np
import tifffile

from ..errors import MuPDError, SlideError
from .slide import MppLike, Slide, check_level_size, lazy_level

#: Strip-based pages (no tiles) are grouped into dask chunks of about this many rows.
STRIP_CHUNK_ROWS = 512
_UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0, "nm": 1e-3, "nanometer": 1e-3,
                "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6}


def tiff_kind(tf: tifffile.TiffFile, path: Path) -> str:
    """Our format name for an open TIFF ('svs', 'ome-tiff', 'qptiff', 'tiff')."""
    if tf.is_svs:
        return "svs"
    if tf.is_ndpi:
        return "ndpi"
    if tf.is_scn:
        return "scn"
    if tf.is_qpi or path.suffix.lower() == ".qptiff":
        return "qptiff"
    if tf.is_ome:
        return "ome-tiff"
    return "tiff"


def open_tiff(path: Path, mpp: MppLike = None) -> Slide:
    import tiffslide

    _check_tiff_header(path)
    ts = None
    try:
        ts = tiffslide.TiffSlide(str(path))
        return _build(ts, path, mpp)
    except Exception as exc:
        if ts is not None:
            ts.close()
        if isinstance(exc, MuPDError):
            raise
        raise SlideError(f"cannot open {path} as a TIFF slide ({type(exc).__name__}: {exc}); "
                         "the file may be truncated or corrupt") from exc


def _check_tiff_header(path: Path) -> None:
    """Reject non-TIFF files and files cut before their first image directory, by the header alone."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    version = int.from_bytes(head[2:4], "little" if order == "<" else "big") if order else 0
    if version not in (42, 43):
        raise SlideError(f"{path} is not a TIFF/SVS file (it starts with {head[:4]!r}, not a TIFF header); "
                         "was it renamed from another format?")
    raw = head[4:8] if version == 42 else head[8:16]
    first_ifd = int.from_bytes(raw, "little" if order == "<" else "big")
    size = os.path.getsize(path)
    if len(raw) < (4 if version == 42 else 8) or first_ifd >= size:
        raise SlideError(f"{path} is truncated: its first image directory is at byte {first_ifd} but the file "
                         f"has {size} bytes; copy or download it again")


def _build(ts, path: Path, user_mpp: MppLike) -> Slide:
    tf: tifffile.TiffFile = ts.ts_tifffile
    with warnings.catch_warnings():  # NDPI: tiffslide parses mpp and lens, all we read
        warnings.filterwarnings("ignore", "hamamatsu-format metadata parsing only partially")
        props = ts.properties
    kind = tiff_kind(tf, path)
    composition = props.get("tiffslide.series-composition")
    located = composition["located_series"] if composition else {props.get("tiffslide.series-index") or 0: None}
    for index in located:
        _check_complete(tf.series[index], path)
    series = tf.series[next(iter(located))]
    axes = props["tiffslide.series-axes"]
    if composition and axes != "YXS":
        raise SlideError(f"{path}: a {kind} slide of several {axes} regions is not supported (RGB only)")
    group = ts.zarr_group
    size = os.path.getsize(path)
    levels, readers = [], []
    for i in range(ts.level_count):
        if composition:
            like = group[f"{next(iter(located))}/{i}"]
            shape = composition["level_shapes"][i]
            check_level_size(path, i, shape, like.chunks, like.dtype, size)
            read = _composed_reader(ts, i, located, series.dtype)
            levels.append(lazy_level(read, shape, like.chunks, like.dtype))
            readers.append(read)
            continue
        arr = group[str(i)]
        check_level_size(path, i, arr.shape, arr.chunks, arr.dtype, size)
        levels.append(_as_yxc(da.from_zarr(arr, chunks=arr.chunks), axes))
        readers.append(_reader(ts, i, axes))

    n_channels = int(levels[0].shape[2])
    file_mpp, objective = _mpp_and_objective(props)
    names: list[str] = []
    colors: list[Optional[str]] = []
    metadata: dict = {}
    if kind == "ome-tiff" and tf.ome_metadata:
        names, colors, ome_mpp, metadata = _ome_channels_and_mpp(tf.ome_metadata)
        file_mpp = ome_mpp or file_mpp
    elif kind == "qptiff":
        names, colors, qpi_mpp, qpi_obj = _qptiff_channels_and_mpp(series, n_channels)
        file_mpp = qpi_mpp or file_mpp
        objective = qpi_obj or objective
    photometric = series.keyframe.photometric
    is_rgb = (n_channels == 3 and levels[0].dtype == np.uint8 and axes == "YXS"
              and photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR))
    if is_rgb:
        names, colors = ["R", "G", "B"], ["FF0000", "00FF00", "0000FF"]
    if len(names) != n_channels:
        names, colors = [f"channel {i}" for i in range(n_channels)], [None] * n_channels

    associated = {}
    for name in ts.associated_images:
        try:
            associated[name] = np.asarray(ts.associated_images[name])
        except Exception:  # a broken label/macro must not stop the slide from opening
            continue
    return Slide(path, kind, levels, readers, names, is_rgb, file_mpp=file_mpp, user_mpp=user_mpp,
                 objective_power=objective, associated_images=associated, channel_colors=colors,
                 metadata=metadata, close=ts.close)


def _check_complete(series: tifffile.TiffPageSeries, path: Path) -> None:
    """Refuse a truncated file now, instead of a decoder error deep inside napari later."""
    size = os.path.getsize(path)
    for level_index, level in enumerate(series.levels):
        for page in level.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            used = counts > 0
            end = int((offsets[used] + counts[used]).max()) if used.any() else 0
            if end > size:
                raise SlideError(f"{path} is truncated: level {level_index} needs {end} bytes but the file has "
                                 f"{size}; copy or download it again")


def _as_yxc(arr: da.Array, axes: str) -> da.Array:
    if axes == "YXS":
        out = arr
    elif axes == "CYX":
        out = arr.transpose(1, 2, 0)
    elif axes == "YX":
        out = arr[..., None]
    else:
        raise SlideError(f"unsupported TIFF axes {axes!r}")
    rows, cols = out.chunks[0][0], out.chunks[1][0]
    if cols == out.shape[1] and rows < 256 and out.shape[0] > rows:  # strips: ~512-row chunks on strip boundaries
        out = out.rechunk({0: max(rows, (STRIP_CHUNK_ROWS // rows) * rows)})
    return out


def _reader(ts, level: int, axes: str):
    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        arr = ts.zarr_group[str(level)]  # tiffslide keeps one zarr view per thread
        if axes == "YXS":
            return arr[y0:y1, x0:x1, :]
        if axes == "CYX":
            return np.moveaxis(arr[:, y0:y1, x0:x1], 0, -1)
        return arr[y0:y1, x0:x1][..., None]

    return read


def _composed_reader(ts, level: int, located: dict, dtype: np.dtype):
    """Reads level pixels of a canvas made of regions at (y, x) offsets; outside them white
    (uint8 brightfield glass) or 0."""
    fill = 255 if dtype == np.uint8 else 0

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=dtype)
        for index, offsets in located.items():
            arr = ts.zarr_group[f"{index}/{level}"]
            oy, ox = int(offsets[level][0]), int(offsets[level][1])
            ya, yb = max(y0, oy), min(y1, oy + arr.shape[0])
            xa, xb = max(x0, ox), min(x1, ox + arr.shape[1])
            if ya < yb and xa < xb:
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = arr[ya - oy : yb - oy, xa - ox : xb - ox, :3]
        return out

    return read


#: Inch-based resolution tags coarser than this (um/px) are screen/print DPI defaults, not a calibration.
MAX_INCH_MPP = 25.0


def _mpp_and_objective(props) -> tuple[Optional[tuple[float, float]], Optional[float]]:
    mx, my = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
    mpp = (float(mx), float(my)) if mx and my else None
    if mpp and props.get("tiff.ResolutionUnit") == "INCH" and max(mpp) > MAX_INCH_MPP:
        mpp = None  # e.g. 72 dpi from an image editor would claim 352.8 um/px
    obj = props.get("tiffslide.objective-power")
    return mpp, (float(obj) if obj else None)


def _hex_from_ome_color(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    rgba = int(value) & 0xFFFFFFFF  # OME stores signed 32-bit RGBA
    return f"{rgba >> 24 & 255:02X}{rgba >> 16 & 255:02X}{rgba >> 8 & 255:02X}"


def _ome_channels_and_mpp(xml: str):
    root = ET.fromstring(xml)
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {"ome": ""}
    pixels = root.find(".//ome:Image/ome:Pixels", ns) if ns["ome"] else root.find(".//Image/Pixels")
    if pixels is None:
        return [], [], None, {}
    channels = pixels.findall("ome:Channel", ns) if ns["ome"] else pixels.findall("Channel")
    names, colors = [], []
    for i, ch in enumerate(channels):
        names.append(ch.get("Name") or f"channel {i}")
        colors.append(_hex_from_ome_color(ch.get("Color")))
    mpp = None
    sx, sy = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
    if sx and sy:
        fx = _UM_PER_UNIT.get(pixels.get("PhysicalSizeXUnit", "µm"))
        fy = _UM_PER_UNIT.get(pixels.get("PhysicalSizeYUnit", "µm"))
        if fx and fy:
            mpp = (float(sx) * fx, float(sy) * fy)
    return names, colors, mpp, _json_description(root, ns)


def _json_description(root: ET.Element, ns: dict) -> dict:
    """The free-form metadata `write_ome_tiff` keeps as JSON in Image/Description ({} otherwise)."""
    node = root.find(".//ome:Image/ome:Description", ns) if ns["ome"] else root.find(".//Image/Description")
    try:
        value = json.loads(node.text) if node is not None and node.text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _qptiff_channels_and_mpp(series: tifffile.TiffPageSeries, n_channels: int):
    """Channel names/colours from each plane's PerkinElmer XML; pixel size from ScanResolution."""
    names, colors = [], []
    mpp = objective = None
    for page in series.pages[:n_channels]:
        try:
            root = ET.fromstring(page.description.encode("utf-8", "replace").decode("utf-8").split("?>", 1)[-1])
        except ET.ParseError:
            return [], [], None, None
        names.append((root.findtext("Name") or root.findtext("Biomarker") or "").strip() or f"channel {len(names)}")
        rgb = (root.findtext("Color") or "").split(",")
        colors.append("".join(f"{int(v):02X}" for v in rgb) if len(rgb) == 3 else None)
        if mpp is None:
            px = root.findtext(".//ScanResolution/PixelSizeMicrons")
            mag = root.findtext(".//ScanResolution/Magnification")
            mpp = (float(px), float(px)) if px else None
            objective = float(mag) if mag else None
    return names, colors, mpp, objective
