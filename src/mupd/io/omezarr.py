"""OME-Zarr (NGFF multiscales): write a calibrated (Y, X, C) pyramid, and open one as a Slide.

Stored as (c, y, x) as NGFF requires, with scales in micrometres and omero channel names and
colours; our own extra metadata sits under the group attribute "mupd".
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import dask.array as da
import numpy as np
import zarr

from ..errors import SlideError
from .pyramid import TILE, write_pyramid_atomically
from .slide import MppLike, Slide, check_level_size

_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
       "angstrom": 1e-4}


def _write_pyramid(target: Path, levels: list[da.Array], mpp: tuple[float, float], names: list[str],
                   colors: list[Optional[str]], metadata: Optional[dict], name: str) -> None:
    """The inner write (separate so that a failure inside it is what atomicity is tested against)."""
    from ome_zarr.writer import add_metadata, write_multiscale

    group = zarr.open_group(str(target), mode="w")
    rgb = names == ["R", "G", "B"] and levels[0].dtype == np.uint8
    chunk_c = levels[0].shape[2] if rgb else 1  # RGB tiles whole; fluorescence one channel per chunk
    pyramid = [lv.transpose(2, 0, 1).rechunk((chunk_c, TILE, TILE)) for lv in levels]
    # level i pixels are exact 2**i x 2**i blocks of level 0 (odd edges trimmed)
    transforms = [[{"type": "scale", "scale": [1.0, mpp[1] * 2**i, mpp[0] * 2**i]}] for i in range(len(levels))]
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    with warnings.catch_warnings():  # explicit per-level scales are what NGFF stores; keep them exact
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale(pyramid, group, axes=axes, coordinate_transformations=transforms,
                         storage_options={"chunks": (chunk_c, TILE, TILE)}, name=name)
    window = _window(levels[-1])
    channels = [{"label": n, "active": True, **({"color": c} if c else {}), "window": window}
                for n, c in zip(names, colors)]
    add_metadata(group, {"omero": {"channels": channels, "rdefs": {"model": "color"}}})
    if metadata:
        group.attrs["mupd"] = metadata


def _window(level: da.Array) -> dict:
    if np.issubdtype(level.dtype, np.integer):
        info = np.iinfo(level.dtype)
        lo, hi = float(info.min), float(info.max)
        return {"min": lo, "max": hi, "start": lo, "end": hi}
    lo, hi = (float(v) for v in da.compute(level.min(), level.max()))
    return {"min": lo, "max": hi, "start": lo, "end": hi}


def write_ome_zarr(path: str | Path, image, mpp: float | tuple[float, float],
                   channel_names: Optional[Sequence[str]] = None, colors: Optional[Sequence[str]] = None,
                   overwrite: bool = False, n_levels: Optional[int] = None,
                   metadata: Optional[dict] = None) -> Path:
    """Write (Y, X, C) numpy/dask as an NGFF multiscale pyramid; atomic, never clobbers by default."""
    return write_pyramid_atomically("OME-Zarr", path, image, mpp, channel_names, colors, overwrite,
                                    n_levels, metadata, _write_pyramid)


def is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zattrs").exists()
                              or (path / ".zgroup").exists())


def open_ome_zarr(path: Path, mpp: MppLike = None) -> Slide:
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:
        raise SlideError(f"cannot open {path} as a zarr group ({type(exc).__name__}: {exc})") from exc
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise SlideError(f"{path} is a zarr folder but has no OME-NGFF 'multiscales' metadata")
    ms = multiscales[0]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["t", "c", "z", "y", "x"])]
    units = {a["name"]: a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict)}
    if "y" not in axes or "x" not in axes:
        raise SlideError(f"{path}: multiscales axes {axes} have no y and x")
    select, order = _to_yxc(axes)
    levels, readers = [], []
    for i, ds in enumerate(ms["datasets"]):
        try:
            arr = group[ds["path"]]
        except KeyError:
            raise SlideError(f"{path}: pyramid level '{ds['path']}' listed in the metadata is missing") from None
        check_level_size(path, i, arr.shape, arr.chunks, arr.dtype)  # chunk files: no file size to compare
        levels.append(_dask_yxc(da.from_zarr(arr, chunks=arr.chunks), select, order, axes))
        readers.append(_reader(arr, axes))
    n_channels = int(levels[0].shape[2])
    omero = ome.get("omero", {}).get("channels", [])
    names = [c.get("label") or f"channel {i}" for i, c in enumerate(omero)]
    colors = [c.get("color") for c in omero]
    if len(names) != n_channels:
        names, colors = [f"channel {i}" for i in range(n_channels)], [None] * n_channels
    is_rgb = n_channels == 3 and levels[0].dtype == np.uint8 and (
        names == ["R", "G", "B"] or [str(c).upper() for c in colors] == ["FF0000", "00FF00", "0000FF"])
    file_mpp = _mpp(ms, axes, units)
    return Slide(path, "ome-zarr", levels, readers, names, is_rgb, file_mpp=file_mpp, user_mpp=mpp,
                 channel_colors=colors, metadata=attrs.get("mupd"), origin_um=_origin(ms, axes, units))


def _origin(ms: dict, axes: list[str], units: dict) -> Optional[tuple[float, float]]:
    """(y, x) um of level-0 pixel 0's centre from NGFF translations; None when there are none."""
    iy, ix = axes.index("y"), axes.index("x")
    fy, fx = _UM.get(units.get("y") or ""), _UM.get(units.get("x") or "")
    shifts = [t["translation"] for t in ms["datasets"][0].get("coordinateTransformations", [])
              + ms.get("coordinateTransformations", []) if t.get("type") == "translation"]
    if not shifts or not fy or not fx:
        return None
    return (sum(float(t[iy]) for t in shifts) * fy, sum(float(t[ix]) for t in shifts) * fx)


def set_ngff_translation(path: str | Path, translate_um: Sequence[float], mpp: float) -> None:
    """Place an OME-Zarr pyramid in micrometres (NGFF `translation`), so viewers overlay it on its slide.

    `translate_um` is (y, x) of level-0 pixel 0's centre, as napari's `translate`. Level i pixel 0
    spans level-0 pixels 0 .. 2**i - 1, so its centre sits (2**i - 1) / 2 pixels after level 0's.
    """
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    ms = ome["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
    for i, ds in enumerate(ms["datasets"]):
        shift = (2**i - 1) / 2 * mpp
        vector = [0.0] * len(axes)
        vector[axes.index("y")], vector[axes.index("x")] = translate_um[0] + shift, translate_um[1] + shift
        ds["coordinateTransformations"] = [t for t in ds["coordinateTransformations"]
                                           if t.get("type") != "translation"] + [
            {"type": "translation", "translation": vector}]
    group.attrs.update(attrs)


def _to_yxc(axes: list[str]):
    select = tuple(slice(None) if a in ("c", "y", "x") else 0 for a in axes)
    kept = [a for a in axes if a in ("c", "y", "x")]
    order = [kept.index("y"), kept.index("x")] + ([kept.index("c")] if "c" in kept else [])
    return select, order


def _dask_yxc(arr: da.Array, select, order, axes) -> da.Array:
    out = arr[select].transpose(order)
    return out if "c" in axes else out[..., None]


def _reader(arr, axes: list[str]):
    _, order = _to_yxc(axes)

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        key = tuple(slice(y0, y1) if a == "y" else slice(x0, x1) if a == "x" else slice(None) if a == "c" else 0
                    for a in axes)
        out = np.transpose(arr[key], order)
        return out if "c" in axes else out[..., None]

    return read


def _mpp(ms: dict, axes: list[str], units: dict) -> Optional[tuple[float, float]]:
    """Level-0 pixel size in um from the scale transforms; None when the axes carry no length unit."""
    iy, ix = axes.index("y"), axes.index("x")
    sy = sx = 1.0
    for t in ms["datasets"][0].get("coordinateTransformations", []) + ms.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            sy, sx = sy * float(t["scale"][iy]), sx * float(t["scale"][ix])
    fy, fx = _UM.get(units.get("y") or ""), _UM.get(units.get("x") or "")
    if not fy or not fx:
        return None
    return (sx * fx, sy * fy)
