"""Annotations as GeoJSON the way QuPath writes them: level-0 pixels, closed rings, classifications.

QuPath (0.4 and later) exports objects as a FeatureCollection or a bare array of Features; each
has `properties.objectType` ("annotation", "detection", "cell", ...), an optional
`classification` ({"name": ..., "color": [r, g, b]}, or "names" for a derived class), optional
`measurements` (a name -> number object; an array of {name, value} before 0.4), and a
Polygon or MultiPolygon geometry whose first ring is the outline and the others its holes.
Ellipses are polygons flagged `"isEllipse": true` in the geometry; coordinates are level-0
pixels with (0, 0) the top-left corner of the image.

A `Region` is one polygon: a MultiPolygon feature becomes one Region per part sharing the
feature's `id`, and regions that share an id are written back as one MultiPolygon feature.
Holes are kept (`Region.holes`). Reading keeps annotations only unless asked for more
(a QuPath export with its cell detections would otherwise turn every cell into a region).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import MuPDError
from .atomic import atomic_output

SHAPES = ("polygon", "rectangle", "ellipse")
Ring = list[tuple[float, float]]
#: Files with more features than this are written without indentation (cell detections).
INDENT_MAX_FEATURES = 1000


class GeoJSONError(MuPDError):
    """A GeoJSON file or region list that cannot be read or written as annotations."""


@dataclass
class Region:
    """One annotation (or detection); `polygon` is the outline in level-0 pixel (x, y), open
    (first point not repeated), `holes` the rings cut out of it, `id` the QuPath feature it
    belongs to (parts of one MultiPolygon share it)."""

    polygon: Ring
    name: Optional[str] = None
    classification: Optional[str] = None
    color: Optional[tuple[int, int, int]] = None
    shape: str = "polygon"
    holes: list[Ring] = field(default_factory=list)
    id: Optional[str] = None
    object_type: str = "annotation"
    measurements: dict[str, float] = field(default_factory=dict)


def _ring(points: Sequence[Sequence[float]], where: str) -> list[list[float]]:
    pts = [(float(x), float(y)) for x, y in points]
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts = pts[:-1]
    if len(pts) < 3:
        raise GeoJSONError(f"{where}: a polygon needs at least 3 distinct points, got {len(pts)}")
    return [list(p) for p in pts + [pts[0]]]


def _rings(region: Region, where: str) -> list[list[list[float]]]:
    if region.shape not in SHAPES:
        raise GeoJSONError(f"{where}: shape {region.shape!r} is not one of {SHAPES}")
    return [_ring(region.polygon, where)] + [_ring(h, f"{where} hole {k}") for k, h in enumerate(region.holes)]


def _feature(parts: Sequence[Region], where: str) -> dict:
    region = parts[0]
    props: dict = {"objectType": region.object_type}
    if region.name:
        props["name"] = region.name
    if region.classification or region.color:
        cls: dict = {"name": region.classification or ""}
        if region.color:
            cls["color"] = [int(c) for c in region.color]
        props["classification"] = cls
    if region.shape != "polygon":
        props["mupdShape"] = region.shape  # QuPath ROIs are polygons in GeoJSON; keep the original kind
    if region.measurements:
        props["measurements"] = {str(k): _number(v, f"{where} measurement {k!r}")
                                 for k, v in region.measurements.items()}
    coords = [_rings(p, where) for p in parts]
    geometry: dict = ({"type": "Polygon", "coordinates": coords[0]} if len(coords) == 1
                      else {"type": "MultiPolygon", "coordinates": coords})
    if region.shape == "ellipse":
        geometry["isEllipse"] = True  # QuPath's flag: read back as an ellipse (its bounding box)
    feature: dict = {"type": "Feature", "geometry": geometry, "properties": props}
    if region.id:
        feature["id"] = region.id
    return feature


def _number(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GeoJSONError(f"{where} is {value!r}; QuPath measurements are numbers")
    return value if isinstance(value, int) or math.isfinite(value) else None  # NaN: no value


def write_geojson(path: str | Path, regions: Sequence[Region], overwrite: bool = False) -> Path:
    """A FeatureCollection of annotations; atomic, refuses to replace an existing file by default.
    Consecutive regions with the same `id` are written as one MultiPolygon feature."""
    final = Path(path)
    groups: list[list[Region]] = []
    for r in regions:
        if groups and r.id is not None and groups[-1][0].id == r.id:
            groups[-1].append(r)
        else:
            groups.append([r])
    features = [_feature(g, f"region {i} ({g[0].name or 'unnamed'}) for {final}")
                for i, g in enumerate(groups)]
    indent = 1 if len(features) <= INDENT_MAX_FEATURES else None
    with atomic_output(final, overwrite) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=indent,
                                  ensure_ascii=False), encoding="utf-8")
    return final


def read_geojson(path: str | Path, object_types: Optional[Sequence[str]] = ("annotation",)
                 ) -> list[Region]:
    """Regions from a QuPath-style GeoJSON (FeatureCollection, array of Features, Feature or bare
    geometry). Features of another `objectType` than `object_types` are skipped (None: keep all);
    a feature without one counts as an annotation."""
    p = Path(path)
    if not p.exists():
        raise GeoJSONError(f"GeoJSON file {p} does not exist")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeoJSONError(f"{p} is not valid JSON: {exc}") from None
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and "coordinates" in doc:
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise GeoJSONError(f"{p} is not GeoJSON (no FeatureCollection, Feature or geometry at the top)")
    if not isinstance(features, list):
        raise GeoJSONError(f"{p}: 'features' is not an array")
    regions: list[Region] = []
    for i, feat in enumerate(features):
        props = (feat.get("properties") if isinstance(feat, dict) else None) or {}
        kind = props.get("objectType", props.get("object_type", "annotation"))
        if object_types is None or kind in object_types:
            regions.extend(_regions(feat, f"{p} feature {i}", i))
    return regions


def _classification(props: dict, where: str) -> tuple[Optional[str], Optional[tuple[int, int, int]]]:
    cls = props.get("classification") or {}
    if not isinstance(cls, dict):
        raise GeoJSONError(f"{where}: classification is not an object")
    name = cls.get("name")
    if not name and isinstance(cls.get("names"), list):  # a derived class, e.g. Tumor: Positive
        name = ": ".join(str(n) for n in cls["names"])
    color = None
    try:
        if isinstance(cls.get("color"), list):
            color = tuple(int(c) for c in cls["color"][:3])
        elif isinstance(cls.get("colorRGB"), int):  # QuPath before 0.4: packed (A)RGB
            v = cls["colorRGB"]
            color = ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    except (TypeError, ValueError):
        raise GeoJSONError(f"{where}: classification colour {cls.get('color')!r} is not [r, g, b]") from None
    return (str(name) if name else None), color


def _measurements(props: dict) -> dict[str, float]:
    raw = props.get("measurements") or {}
    if isinstance(raw, list):  # QuPath before 0.4: [{"name": ..., "value": ...}]
        raw = {m.get("name"): m.get("value") for m in raw if isinstance(m, dict)}
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _regions(feat: Any, where: str, index: int) -> list[Region]:
    if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
        raise GeoJSONError(f"{where} has no geometry object")
    geom, props = feat["geometry"], feat.get("properties") or {}
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Polygon":
        polygons = [coords]
    elif kind == "MultiPolygon":
        polygons = coords
    else:
        raise GeoJSONError(f"{where}: geometry type {kind!r} is not an area annotation (Polygon or MultiPolygon)")
    classification, color = _classification(props, where)
    shape = "ellipse" if geom.get("isEllipse") else props.get("mupdShape", "polygon")
    shape = shape if shape in SHAPES else "polygon"
    fid = feat.get("id")
    if fid is None and kind == "MultiPolygon":
        fid = f"feature-{index}"  # parts of one feature stay one annotation when written back
    out = []
    try:
        for rings in polygons:
            outer, *holes = [_open_ring(r, where) for r in rings]
            out.append(Region(outer, props.get("name"), classification, color, shape, holes,
                              None if fid is None else str(fid),
                              str(props.get("objectType", "annotation")), _measurements(props)))
    except (TypeError, ValueError, IndexError):
        raise GeoJSONError(f"{where}: coordinates are not a list of [x, y] rings") from None
    return out


def _open_ring(ring: Any, where: str) -> Ring:
    pts = [(float(x), float(y)) for x, y, *_ in ring]
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts = pts[:-1]
    if len(pts) < 3:
        raise GeoJSONError(f"{where}: polygon with fewer than 3 points")
    return pts


def rectangle(x: float, y: float, w: float, h: float, **kw) -> Region:
    """A rectangle annotation (exported as its 4-corner polygon)."""
    return Region([(x, y), (x + w, y), (x + w, y + h), (x, y + h)], shape="rectangle", **kw)


def ellipse(cx: float, cy: float, rx: float, ry: float, n_points: int = 64, **kw) -> Region:
    """An ellipse annotation (exported as an `n_points` polygon)."""
    pts = [(cx + rx * math.cos(2 * math.pi * k / n_points), cy + ry * math.sin(2 * math.pi * k / n_points))
           for k in range(n_points)]
    return Region(pts, shape="ellipse", **kw)
