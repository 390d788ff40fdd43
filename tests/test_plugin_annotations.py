"""QuPath GeoJSON through the plugin's reader: a Shapes layer placed on the open slide (its scale
and translate), classes as features and edge colours, holes kept, and saved back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mupd.io import read_geojson
from plugin_fixtures import needs_display

pytestmark = [pytest.mark.gui, needs_display]

QUPATH = Path(__file__).parent / "data" / "qupath_annotations.geojson"


@pytest.fixture
def slide_path() -> Path:
    from support_slides import cmu_slide_path

    return cmu_slide_path()


def test_qupath_annotations_open_on_the_slide_and_save_back_unchanged(make_napari_viewer, slide_path,
                                                                      tmp_path):
    from napari_mupd._regions import shape_regions

    viewer = make_napari_viewer()
    (slide,) = viewer.open(str(slide_path), plugin="napari-mupd")
    slide.translate = (100.0, 50.0)  # a slide placed off the origin: the annotations must follow it
    (shapes,) = viewer.open(str(QUPATH), plugin="napari-mupd")
    regions = read_geojson(QUPATH)
    assert shapes._type_string == "shapes" and len(shapes.data) == len(regions) == 5  # cell skipped
    assert list(shapes.shape_type) == ["polygon", "polygon", "polygon", "ellipse", "polygon"]
    # every vertex sits on the slide pixel it names: same world point as the slide's (y, x)
    for i in (0, 1, 2, 4):
        world = np.array([shapes.data_to_world(v) for v in shapes.data[i]])
        want = np.array([slide.data_to_world((y, x)) for x, y in regions[i].polygon])
        np.testing.assert_allclose(world, want, atol=1e-9)
    # the ellipse is napari's: its bounding box, QuPath's ellipse envelope
    xy = np.asarray(regions[3].polygon)
    np.testing.assert_allclose(shapes.data[3].min(axis=0), xy.min(axis=0)[::-1])
    np.testing.assert_allclose(shapes.data[3].max(axis=0), xy.max(axis=0)[::-1])
    # classes and names as features, class colours as edge colours, holes kept as level-0 rings
    assert list(shapes.features["classification"])[:4] == ["Tumor", "Stroma", "Stroma", "Tumor"]
    assert shapes.features["classification"].iloc[4] is None
    np.testing.assert_allclose(shapes.edge_color[0], [200 / 255, 0, 0, 1])
    np.testing.assert_allclose(shapes.edge_color[1], [150 / 255, 200 / 255, 150 / 255, 1])
    assert json.loads(shapes.features["holes"].iloc[0]) == [[list(p) for p in regions[0].holes[0]]]
    # what the Translate panel sends: the file's level-0 polygon and hole, through the transforms
    (core,) = shape_regions(shapes, slide, [0])
    np.testing.assert_allclose(core.polygon, regions[0].polygon, atol=1e-3)
    assert core.holes == regions[0].holes and core.classification == "Tumor"

    viewer.layers.selection.active = shapes
    out = tmp_path / "back.geojson"
    viewer.layers.save(str(out), selected=True, plugin="napari-mupd")
    back = read_geojson(out)
    for a, b in zip(back, regions):
        assert (a.name, a.classification, a.color, a.shape, a.id) == (b.name, b.classification, b.color,
                                                                      b.shape, b.id)
        assert a.holes == b.holes
        if b.shape != "ellipse":
            np.testing.assert_allclose(a.polygon, b.polygon, atol=1e-9)
        else:  # QuPath reads an ellipse back from its envelope: the same envelope
            np.testing.assert_allclose(np.min(a.polygon, axis=0), np.min(b.polygon, axis=0), atol=1e-9)
            np.testing.assert_allclose(np.max(a.polygon, axis=0), np.max(b.polygon, axis=0), atol=1e-9)
    doc = json.loads(out.read_text())
    assert [f["geometry"]["type"] for f in doc["features"]] == ["Polygon", "MultiPolygon", "Polygon", "Polygon"]
    assert doc["features"][2]["geometry"]["isEllipse"] is True


def test_without_a_slide_annotations_open_in_pixels_with_a_warning(make_napari_viewer, monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", shown.append)
    viewer = make_napari_viewer()
    (shapes,) = viewer.open(str(QUPATH), plugin="napari-mupd")
    assert tuple(shapes.scale) == (1.0, 1.0)
    np.testing.assert_allclose(shapes.data[0][0], [1400.0, 800.0])  # (y, x) level-0 pixels
    assert shown and "no slide is open" in shown[0]
