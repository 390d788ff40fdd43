"""napari writers: image layers -> OME-Zarr / OME-TIFF pyramids, a shapes layer -> GeoJSON.

Layers carry micrometres (scale + units); files carry level-0 pixels plus mpp, the way QuPath and
the engine expect. Both directions of that conversion live here. Existing paths are refused
(napari hands over whatever path the user picked; `mupd.io` raises OutputExistsError).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ._channel_colors import colormap_hex
from ._regions import SlidePlacement, current_slide_layer, ellipse_outline, world_to_level0

LayerData = tuple[Any, dict, str]


def write_ome_zarr(path: str, layer_data: list[LayerData]) -> list[str]:
    """Image layers (one RGB, or same-size single-channel layers as channels) as an OME-Zarr pyramid."""
    from mupd.io import write_ome_zarr as write
    from mupd.io.omezarr import set_ngff_translation

    args = _image_args(path, layer_data)
    out = write(path, **args)
    translate = args["metadata"]["translate_um"]
    if any(translate):  # placed over its slide (e.g. a virtual stain): keep it there on reopening
        set_ngff_translation(out, translate, float(np.ravel(args["mpp"])[0]))
    return [str(out)]


def write_ome_tiff(path: str, layer_data: list[LayerData]) -> list[str]:
    """Image layers as a pyramidal OME-TIFF (same layer rules as `write_ome_zarr`)."""
    from mupd.io import write_ome_tiff as write

    return [str(write(path, **_image_args(path, layer_data)))]


def write_geojson(path: str, data: list, meta: dict) -> list[str]:
    """A shapes layer as QuPath GeoJSON in level-0 pixels; paths and lines are refused (not areas)."""
    from mupd.io import write_geojson as write

    return [str(write(path, shapes_to_regions(data, meta, path)))]


# -- images ------------------------------------------------------------------------------------
def _image_args(path: str, layer_data: list[LayerData]) -> dict:
    from mupd.errors import MuPDError

    if not layer_data:
        raise MuPDError(f"nothing to save to {path}: select at least one image layer")
    names = [meta.get("name", f"layer {i}") for i, (_, meta, _) in enumerate(layer_data)]
    levels0 = [_level0(data, meta) for data, meta, _ in layer_data]
    rgb = [bool(meta.get("rgb")) for _, meta, _ in layer_data]
    if any(rgb) and len(layer_data) > 1:
        raise MuPDError(f"cannot save {names} together to {path}: an RGB layer is saved on its own "
                        "(select just that layer)")
    mpps = [layer_mpp(meta, path) for _, meta, _ in layer_data]
    shapes = {a.shape[:2] for a in levels0}
    if len(shapes) > 1 or any(not np.allclose(m, mpps[0]) for m in mpps):
        raise MuPDError(f"cannot save {names} as channels of one image in {path}: their sizes "
                        f"{[a.shape[:2] for a in levels0]} or pixel sizes {mpps} (um) differ")
    if len({a.dtype for a in levels0}) > 1:
        raise MuPDError(f"cannot save {names} as channels of one image in {path}: their dtypes "
                        f"{[str(a.dtype) for a in levels0]} differ")
    metadata = {"source_layers": names,
                "translate_um": [float(v) for v in layer_data[0][1].get("translate", (0, 0))[-2:]]}
    if rgb[0]:
        return {"image": levels0[0], "mpp": mpps[0], "metadata": metadata}
    import dask.array as da

    image = da.stack([da.asarray(a) for a in levels0], axis=-1)
    colors = [colormap_hex(meta["colormap"]) if meta.get("colormap") is not None else None
              for _, meta, _ in layer_data]
    return {"image": image, "mpp": mpps[0], "channel_names": names, "colors": colors,
            "metadata": metadata}


def _level0(data: Any, meta: dict):
    """The full-resolution array of a (possibly multiscale) 2D layer, still lazy."""
    from mupd.errors import MuPDError

    arr = data[0] if meta.get("multiscale") else data
    want = 3 if meta.get("rgb") else 2
    if arr.ndim != want:
        raise MuPDError(f"layer {meta.get('name')!r} has shape {tuple(arr.shape)}; only 2D "
                        f"{'RGB ' if meta.get('rgb') else 'single-channel '}images can be saved as slides")
    return arr


def layer_mpp(meta: dict, path: str) -> tuple[float, float]:
    """(x, y) micrometres per data pixel from a layer's scale and units; uncalibrated layers refused."""
    import pint

    from mupd.errors import MuPDError

    _check_axis_aligned(meta, path)
    scale = [float(s) for s in meta.get("scale", (1.0, 1.0))[-2:]]
    units = list(meta.get("units") or ("pixel", "pixel"))[-2:]
    ureg = pint.get_application_registry()
    try:
        um = [ureg.Quantity(s, u).to("micrometer").magnitude for s, u in zip(scale, units)]
    except (pint.errors.DimensionalityError, pint.errors.UndefinedUnitError):
        raise MuPDError(
            f"layer {meta.get('name')!r} has no physical pixel size (units {[str(u) for u in units]}), so "
            f"{path} cannot be calibrated: set the layer's scale in micrometres and units to ('um', 'um'), "
            "or reopen the slide with its mpp") from None
    return float(um[1]), float(um[0])


def _check_axis_aligned(meta: dict, path: str) -> None:
    from mupd.errors import MuPDError

    rotate = np.asarray(meta.get("rotate", np.eye(2)), dtype=float)
    shear = np.asarray(meta.get("shear", 0.0), dtype=float)
    affine = np.asarray(meta.get("affine", np.eye(3)), dtype=float)
    if not (np.allclose(rotate, np.eye(len(rotate))) and np.allclose(shear, 0)
            and np.allclose(affine, np.eye(len(affine)))):
        raise MuPDError(f"layer {meta.get('name')!r} is rotated, sheared or has an affine transform; "
                        f"{path} stores axis-aligned level-0 pixels only: reset the transform first")


# -- shapes ------------------------------------------------------------------------------------
def shapes_to_regions(data: Sequence[np.ndarray], meta: dict, path: str = "GeoJSON") -> list:
    """napari shapes (data coordinates, (.., y, x)) -> `mupd.io.Region`s in level-0 pixel (x, y).

    World (um) = data * scale + translate, taken to level-0 pixels through the slide layer's
    transform (`world_to_level0`), so its scale and translate are honoured: the current viewer's
    layer of the shapes' slide (metadata 'slide_path', set by the GeoJSON reader), or for shapes
    of no known slide the active or top-most slide layer. With that slide not open (a headless
    save) the shapes' metadata place it: level-0 pixels = (world - origin) / mpp, where mpp is
    the slide's (metadata 'mpp') or else the layer's own scale, which is what napari gives a
    shapes layer drawn over the slide, and origin the slide layer's translate when it was read
    (metadata 'level0_origin_um'; else 0). The features `holes` (level-0 rings as JSON) and `id`
    (QuPath feature) come back as they were read.
    """
    import json

    from mupd.errors import MuPDError
    from mupd.io import Region

    _check_axis_aligned(meta, path)
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), dtype=float)[-2:]
    extra = meta.get("metadata") or {}
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), dtype=float)[-2:]
    slide = current_slide_layer(extra.get("slide_path"))
    if slide is None:
        slide_mpp = extra.get("mpp")
        slide = SlidePlacement(np.asarray(slide_mpp[::-1] if slide_mpp else scale, dtype=float),
                               np.asarray(extra.get("level0_origin_um") or (0.0, 0.0), dtype=float)[-2:])
    types = list(meta.get("shape_type") or ["polygon"] * len(data))
    features = meta.get("features")
    names = _column(features, "name", len(data))
    classes = _column(features, "classification", len(data))
    ids = _column(features, "id", len(data))
    holes = _column(features, "holes", len(data))
    edge = np.asarray(meta.get("edge_color", np.zeros((len(data), 4))), dtype=float).reshape(-1, 4)
    regions = []
    for i, (verts, kind) in enumerate(zip(data, types)):
        yx = np.asarray(verts, dtype=float)[:, -2:]
        if kind == "ellipse":
            yx = ellipse_outline(yx)
        elif kind not in ("rectangle", "polygon"):
            raise MuPDError(f"shape {i} of layer {meta.get('name')!r} is a {kind}, not an area; "
                            f"{path} holds area annotations only (polygon, rectangle, ellipse)")
        xy = world_to_level0(yx * scale + translate, slide)
        # a colour belongs to a class in QuPath: unclassified shapes carry none
        color = tuple(int(c) for c in np.rint(edge[i, :3] * 255)) if i < len(edge) and classes[i] else None
        try:
            rings = json.loads(holes[i]) if holes[i] else []
            rings = [[(float(x), float(y)) for x, y in ring] for ring in rings]
        except (ValueError, TypeError):
            raise MuPDError(f"shape {i} of layer {meta.get('name')!r}: its 'holes' feature is not a "
                            f"JSON list of [x, y] rings: {holes[i]!r}") from None
        regions.append(Region([(float(x), float(y)) for x, y in xy], name=names[i],
                              classification=classes[i], color=color, shape=kind, holes=rings,
                              id=ids[i]))
    return regions


def _column(features: Optional[Any], key: str, n: int) -> list[Optional[str]]:
    if features is None or key not in getattr(features, "columns", ()):
        return [None] * n
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in features[key]]
