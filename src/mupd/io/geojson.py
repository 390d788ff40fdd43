"""Annotations as GeoJSON the way QuPath writes them: level-0 pixels, closed rings, classifications."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import MuPDError
from .atomic import atomic_output

SHAPES = ("polygon", "rectangle", "ellipse")


class GeoJSONError(MuPDError):
    """A GeoJSON file or region list that cannot be read or written as annotations."""


@dataclass
class Region:
    """One annotation; `polygon` is the outline in level-0 pixel (x, y), open (first point not repeated)."""

    polygon: list[tuple[float, float]]
    name: Optional[str] = None
    classification: Optional[str] = None
    color: Optional[tuple[int, int, int]] = None
    shape: str = "polygon"


def _ring(region: Region, where: str) -> list[list[float]]:
    if region.shape not in SHAPES:
        raise GeoJSONError(f"{where}: shape {region.shape!r} is not one of {SHAPES}")
    pts = [(float(x), float(y)) for x, y in region.polygon]
    if len(pts) > 1 and pts[0] == pts[-1]:
        pts = pts[:-1]
    if len(pts) < 3:
        raise GeoJSONError(f"{where}: a polygon needs at least 3 distinct points, got {len(pts)}")
    return [list(p) for p in pts + [pts[0]]]


def _feature(region: Region, where: str) -> dict:
    props: dict = {"objectType": "annotation"}
    if region.name:
        props["name"] = region.name
    if region.classification or region.color:
        cls: dict = {"name": region.classification or ""}
        if region.color:
            cls["color"] = [int(c) for c in region.color]
        props["classification"] = cls
    if region.shape != "polygon":
        props["mupdShape"] = region.shape  # QuPath ROIs are polygons in GeoJSON; keep the original kind
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(region, where)]},
            "properties": props}


def write_geojson(path: str | Path, regions: Sequence[Region], overwrite: bool = False) -> Path:
    """A FeatureCollection of annotations; atomic, refuses to replace an existing file by default."""
    final = Path(path)
    features = [_feature(r, f"region {i} ({r.name or 'unnamed'}) for {final}") for i, r in enumerate(regions)]
    with atomic_output(final, overwrite) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1))
    return final


def read_geojson(path: str | Path) -> list[Region]:
    """Regions from a QuPath-style GeoJSON (FeatureCollection, Feature or bare geometry); holes dropped."""
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
    regions: list[Region] = []
    for i, feat in enumerate(features):
        regions.extend(_regions(feat, f"{p} feature {i}"))
    return regions


def _regions(feat: dict, where: str) -> list[Region]:
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
    cls = props.get("classification") or {}
    name, classification = props.get("name"), cls.get("name") or None
    color = tuple(int(c) for c in cls["color"][:3]) if isinstance(cls.get("color"), list) else None
    shape = props.get("mupdShape", "polygon")
    out = []
    try:
        for rings in polygons:
            pts = [(float(x), float(y)) for x, y, *_ in rings[0]]
            if len(pts) > 1 and pts[0] == pts[-1]:
                pts = pts[:-1]
            if len(pts) < 3:
                raise GeoJSONError(f"{where}: polygon with fewer than 3 points")
            out.append(Region(pts, name, classification, color, shape if shape in SHAPES else "polygon"))
    except (TypeError, ValueError, IndexError):
        raise GeoJSONError(f"{where}: coordinates are not a list of [x, y] rings") from None
    return out


def rectangle(x: float, y: float, w: float, h: float, **kw) -> Region:
    """A rectangle annotation (exported as its 4-corner polygon)."""
    return Region([(x, y), (x + w, y), (x + w, y + h), (x, y + h)], shape="rectangle", **kw)


def ellipse(cx: float, cy: float, rx: float, ry: float, n_points: int = 64, **kw) -> Region:
    """An ellipse annotation (exported as an `n_points` polygon)."""
    pts = [(cx + rx * math.cos(2 * math.pi * k / n_points), cy + ry * math.sin(2 * math.pi * k / n_points))
           for k in range(n_points)]
    return Region(pts, shape="ellipse", **kw)
