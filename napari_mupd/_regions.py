"""Where the user's region is, in the slide's level-0 pixels (what the engine takes).

Shapes are drawn in world coordinates (micrometres over a calibrated slide); each vertex goes
through the shapes layer's data->world and the slide layer's world->data transforms, so any
scale or translate on either layer is honoured.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from mupd.errors import RegionError

Polygon = list[tuple[float, float]]  # (x, y) level-0 pixels


def is_slide_layer(layer: Any) -> bool:
    """An image layer opened from a slide file by this plugin's reader."""
    return getattr(layer, "_type_string", "") == "image" and "slide_path" in getattr(layer, "metadata", {})


def slide_size(layer: Any) -> tuple[int, int]:
    """(width, height) of level 0."""
    w, h = layer.metadata["level_dimensions"][0]
    return int(w), int(h)


def roi_shapes(viewer: Any) -> Any:
    """The Shapes layer holding the user's regions: the active one, else the top-most (or None)."""
    active = viewer.layers.selection.active
    if active is not None and active._type_string == "shapes":
        return active
    return next((l for l in reversed(viewer.layers) if l._type_string == "shapes"), None)


def slide_mpp(layer: Any) -> Optional[float]:
    mpp = layer.metadata.get("mpp")
    return float(mpp[0]) if mpp else None


def current_slide_layer(slide_path: Optional[str] = None) -> Any:
    """The slide layer of napari's current viewer showing `slide_path`, or (no path given) the
    active slide layer, else the top-most; None without a viewer or such a layer."""
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is None:
        return None
    slides = [l for l in reversed(viewer.layers) if is_slide_layer(l)]
    if slide_path is not None:
        return next((l for l in slides if l.metadata["slide_path"] == slide_path), None)
    active = viewer.layers.selection.active
    return active if active is not None and is_slide_layer(active) else next(iter(slides), None)


class SlidePlacement(NamedTuple):
    """Where a slide's level 0 lies in the world when its layer is not open: (y, x) micrometres
    per pixel and the world position of pixel (0, 0); stands in for the layer's transform."""

    scale: np.ndarray
    translate: np.ndarray

    def world_to_data(self, point: np.ndarray) -> np.ndarray:
        return (np.asarray(point, dtype=float)[-2:] - self.translate) / self.scale


def world_to_level0(points_world: np.ndarray, slide: Any) -> np.ndarray:
    """(N, 2) world (y, x) points -> (N, 2) level-0 (x, y) pixels of `slide` (a slide layer or a
    `SlidePlacement`), through its world->data transform: any scale or translate is honoured."""
    return np.array([np.asarray(slide.world_to_data(p), dtype=float)[-2:][::-1] for p in points_world],
                    dtype=float).reshape(-1, 2)


def _to_level0(points_world: np.ndarray, slide_layer: Any) -> Polygon:
    # um -> px round trips leave float noise (499.9999...) that would widen the box by a pixel
    return [(round(float(x), 3), round(float(y), 3)) for x, y in world_to_level0(points_world, slide_layer)]


def selected_polygons(shapes_layer: Any, slide_layer: Any) -> list[Polygon]:
    """The selected shapes as level-0 polygons (ellipses come as napari's polygon outline)."""
    return [r.polygon for r in selected_regions(shapes_layer, slide_layer)]


def selected_regions(shapes_layer: Any, slide_layer: Any) -> list[Any]:
    """The selected shapes as level-0 `mupd.io.Region`s (name, class, holes from the features)."""
    if shapes_layer is None or not len(shapes_layer.data):
        raise RegionError("no region: draw a rectangle or polygon in a Shapes layer, select it, "
                          "or choose 'field of view'")
    chosen = sorted(shapes_layer.selected_data)
    if not chosen:
        raise RegionError(f"no shape is selected in layer {shapes_layer.name!r}: select one or "
                          "more shapes (or choose 'field of view')")
    return shape_regions(shapes_layer, slide_layer, chosen)


def class_names(shapes_layer: Any) -> list[str]:
    """The annotation classes of a shapes layer (its `classification` feature), sorted."""
    if shapes_layer is None or "classification" not in shapes_layer.features:
        return []
    return sorted({str(c) for c in shapes_layer.features["classification"] if _present(c)})


def class_regions(shapes_layer: Any, slide_layer: Any, name: str) -> list[Any]:
    """Every shape of class `name` as a level-0 `mupd.io.Region`."""
    classes = shapes_layer.features.get("classification", []) if shapes_layer is not None else []
    chosen = [i for i, c in enumerate(classes) if _present(c) and str(c) == name]
    if not chosen:
        where = f"layer {shapes_layer.name!r}" if shapes_layer is not None else "any Shapes layer"
        raise RegionError(f"no annotation of class {name!r} in {where}: open a GeoJSON with that "
                          "class or pick another class")
    return shape_regions(shapes_layer, slide_layer, chosen)


def shape_regions(shapes_layer: Any, slide_layer: Any, indices: list[int]) -> list[Any]:
    """Shapes `indices` as `mupd.io.Region`s in the slide's level-0 pixels: the outline through
    the layers' transforms (ellipses as napari's polygon outline), name, class and edge colour
    from the layer, holes from its `holes` feature (level-0 rings as JSON, see `_reader`)."""
    import json

    from mupd.io import Region

    features = shapes_layer.features

    def column(key: str, i: int) -> Any:
        value = features[key].iloc[i] if key in features else None
        return value if _present(value) else None

    regions = []
    for i in indices:
        vertices = np.asarray(shapes_layer.data[i], dtype=float)
        if shapes_layer.shape_type[i] == "ellipse":
            vertices = ellipse_outline(vertices)
        world = np.array([shapes_layer.data_to_world(v) for v in vertices])
        klass, name = column("classification", i), column("name", i)
        holes = json.loads(column("holes", i) or "[]")
        color = tuple(int(c) for c in np.rint(np.asarray(shapes_layer.edge_color[i][:3]) * 255))
        regions.append(Region(_to_level0(world, slide_layer), name=None if name is None else str(name),
                              classification=None if klass is None else str(klass),
                              color=color if klass is not None else None,
                              holes=[[(float(x), float(y)) for x, y in h] for h in holes]))
    return regions


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and value != ""


def ellipse_outline(corners: np.ndarray, n_points: int = 64) -> np.ndarray:
    """napari stores an ellipse as its (possibly rotated) bounding box; trace the ellipse inside."""
    centre = corners.mean(axis=0)
    half_u, half_v = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)[:, None]
    return centre + np.cos(t) * half_u + np.sin(t) * half_v


def view_polygon(viewer: Any, slide_layer: Any) -> Polygon:
    """The part of the slide inside the current field of view, as a level-0 rectangle."""
    cy, cx = viewer.camera.center[-2:]
    h_px, w_px = viewer.canvas.size[-2:]
    half_h, half_w = h_px / 2 / viewer.camera.zoom, w_px / 2 / viewer.camera.zoom
    corners = np.array([[cy - half_h, cx - half_w], [cy + half_h, cx + half_w]])
    (x0, y0), (x1, y1) = _to_level0(corners, slide_layer)
    w, h = slide_size(slide_layer)
    x0, x1 = max(0.0, min(x0, x1)), min(float(w), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(h), max(y0, y1))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise RegionError(f"the field of view does not show any of {slide_layer.name!r}: "
                          "pan to the slide or draw a region")
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def check_inside(polygon: Polygon, slide_layer: Any) -> None:
    """Refuse a region that leaves the slide, naming the slide and the overhang."""
    w, h = slide_size(slide_layer)
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    if min(xs) < -0.5 or min(ys) < -0.5 or max(xs) > w + 0.5 or max(ys) > h + 0.5:
        raise RegionError(
            f"region x {min(xs):.0f}..{max(xs):.0f}, y {min(ys):.0f}..{max(ys):.0f} px lies outside "
            f"{slide_layer.name!r} (0..{w} x 0..{h} level-0 px): draw it on the slide")


def area_mm2(polygon: Polygon, mpp: float) -> float:
    """Shoelace area of a level-0 polygon in square millimetres."""
    x, y = np.array(polygon).T
    pixels = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return pixels * mpp * mpp / 1e6
