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


# -- QuPath's own export layout (tests/data/qupath_annotations.geojson, written by hand after
# QuPath 0.4+: FeatureCollection, objectType, classification name + color, ids, a hole, a
# MultiPolygon, an ellipse as a polygon flagged isEllipse in its geometry, a cell detection) --
QUPATH = __import__("pathlib").Path(__file__).parent / "data" / "qupath_annotations.geojson"


def test_reads_qupath_export_layout():
    regions = read_geojson(QUPATH)
    assert [(r.name, r.classification, r.color, r.shape) for r in regions] == [
        ("Tumour core", "Tumor", (200, 0, 0), "polygon"),
        ("Stroma", "Stroma", (150, 200, 150), "polygon"), ("Stroma", "Stroma", (150, 200, 150), "polygon"),
        ("Tumour margin", "Tumor", (200, 0, 0), "ellipse"), (None, None, None, "polygon")]
    core, part1, part2, margin, _ = regions
    assert core.polygon[0] == (800.0, 1400.0) and len(core.polygon) == 5
    assert core.holes == [[(950.0, 1550.0), (1050.0, 1550.0), (1050.0, 1650.0), (950.0, 1650.0)]]
    assert part1.id == part2.id == "7e41d0c9-2a5b-4c8e-b1f6-03d9a7e2c402" and len(part2.polygon) == 3
    assert len(margin.polygon) == 48
    # the cell detection is not a region unless asked for
    (cell,) = read_geojson(QUPATH, object_types=("detection",))
    assert cell.object_type == "detection" and cell.measurements == {"Nucleus: DAB OD mean": 0.42}
    assert len(read_geojson(QUPATH, object_types=None)) == 6


def test_a_bare_feature_array_reads_like_a_collection(tmp_path):
    doc = json.loads(QUPATH.read_text())
    bare = tmp_path / "array.geojson"
    bare.write_text(json.dumps(doc["features"]))  # QuPath's export without FEATURE_COLLECTION
    assert read_geojson(bare) == read_geojson(QUPATH)


def test_qupath_layout_round_trips_polygons_holes_parts_and_ellipses(tmp_path):
    regions = read_geojson(QUPATH)
    back_path = write_geojson(tmp_path / "back.geojson", regions)
    assert read_geojson(back_path) == regions
    doc = json.loads(back_path.read_text())
    kinds = [f["geometry"]["type"] for f in doc["features"]]
    assert kinds == ["Polygon", "MultiPolygon", "Polygon", "Polygon"]  # the two parts rejoined
    assert len(doc["features"][0]["geometry"]["coordinates"]) == 2  # outline + hole
    assert doc["features"][2]["geometry"].get("isEllipse") is True
    assert doc["features"][1]["id"] == "7e41d0c9-2a5b-4c8e-b1f6-03d9a7e2c402"


def test_older_qupath_classification_and_measurement_layouts(tmp_path):
    """QuPath 0.2/0.3: classification colour packed as colorRGB, measurements as name/value pairs;
    0.4+: a derived class as 'names'."""
    p = tmp_path / "old.geojson"
    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    p.write_text(json.dumps([
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"object_type": "annotation", "classification": {"name": "Tumor", "colorRGB": -3670016},
                        "measurements": [{"name": "Area", "value": 100.0}]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"objectType": "annotation", "classification": {"names": ["Tumor", "Positive"],
                                                                      "color": [250, 62, 62]}}}]))
    old, derived = read_geojson(p)
    assert (old.classification, old.color, old.measurements) == ("Tumor", (200, 0, 0), {"Area": 100.0})
    assert derived.classification == "Tumor: Positive"
