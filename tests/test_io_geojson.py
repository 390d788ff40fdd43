"""QuPath-style GeoJSON: round trip of polygons/classes, the file layout, and clear errors."""

from __future__ import annotations

import json

import pytest

from mupd.errors import OutputExistsError
from mupd.io import GeoJSONError, Region, ellipse, read_geojson, rectangle, write_geojson


def _regions() -> list[Region]:
    return [
        Region([(10.5, 20.0), (300.0, 25.0), (280.0, 400.25), (15.0, 390.0)], name="tumour 1",
               classification="Tumor", color=(200, 0, 0)),
        rectangle(1000, 1200, 512, 256, classification="Stroma", color=(0, 150, 0)),
        ellipse(2000, 1500, 100, 60, n_points=32, name="vessel"),
    ]


def test_round_trip(tmp_path):
    regions = _regions()
    path = write_geojson(tmp_path / "ann.geojson", regions)
    back = read_geojson(path)
    assert len(back) == 3
    for a, b in zip(regions, back):
        assert [c for p in b.polygon for c in p] == pytest.approx([c for p in a.polygon for c in p])
        assert (b.name, b.classification, b.color, b.shape) == (a.name, a.classification, a.color, a.shape)


def test_qupath_layout(tmp_path):
    path = write_geojson(tmp_path / "ann.geojson", _regions())
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    feat = doc["features"][0]
    assert feat["properties"]["objectType"] == "annotation"
    assert feat["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    ring = feat["geometry"]["coordinates"][0]
    assert feat["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
    assert doc["features"][1]["geometry"]["coordinates"][0][2] == [1512.0, 1456.0]


def test_reads_qupath_multipolygon_export(tmp_path):
    doc = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "abc",
        "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[0, 0], [10, 0], [10, 10], [0, 0]]], [[[20, 20], [30, 20], [30, 30], [20, 20]]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Immune cells", "color": [160, 90, 160]}},
    }]}
    p = tmp_path / "qupath.geojson"
    p.write_text(json.dumps(doc))
    regions = read_geojson(p)
    assert [r.polygon[0] for r in regions] == [(0.0, 0.0), (20.0, 20.0)]
    assert all(r.classification == "Immune cells" and r.color == (160, 90, 160) for r in regions)


def test_overwrite_refused(tmp_path):
    path = write_geojson(tmp_path / "a.geojson", _regions()[:1])
    with pytest.raises(OutputExistsError, match=r"a\.geojson"):
        write_geojson(path, _regions())
    assert len(read_geojson(path)) == 1
    write_geojson(path, _regions(), overwrite=True)
    assert len(read_geojson(path)) == 3


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"type": "Topology"}', "not GeoJSON"),
    ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}', "Point"),
    ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}', "fewer than 3"),
    ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [["a", "b", "c"]]}}', "coordinates"),
])
def test_bad_geojson(tmp_path, content, match):
    p = tmp_path / "bad.geojson"
    p.write_text(content)
    with pytest.raises(GeoJSONError, match=match) as info:
        read_geojson(p)
    assert "bad.geojson" in str(info.value)


def test_bad_region_refused_before_writing(tmp_path):
    with pytest.raises(GeoJSONError, match="at least 3"):
        write_geojson(tmp_path / "x.geojson", [Region([(0, 0), (1, 1)], name="line")])
    assert not (tmp_path / "x.geojson").exists()
