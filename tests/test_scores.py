"""Predicted per-region scores (mupd.scores): % positive and H-score with known answers, the
cells they come from (the renderer's one segmentation), the polygon and its holes, the CSV and
QuPath GeoJSON exports read back, and the wire."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon
from skimage.color import hed2rgb

from mupd.engine import wire
from mupd.engine.api import TranslateResult
from mupd.errors import ConditionError
from mupd.io import read_geojson
from mupd.models.catalogue import DEFAULT_INTENSITY_BINS, StainCatalogue, intensity_bins_of
from mupd.regions.outputs import StainLayer, write_translation
from mupd.regions.plan import Placement
from mupd.regions.source import ArraySlide
from mupd.regions.translate import RegionTranslator
from mupd.render import MarkerMap, render_ihc_cells
from mupd.scores import (NEGATIVE_COLOR, POSITIVE_COLOR, CellReadout, intensity_class,
                         score_cells, score_marker)
from test_slides_render import _cmu
from support_slides import TileContextPipeline

#: Cell levels of the synthetic tissue, two of each intensity class at threshold 0.3, bins
#: (0.5, 0.7): negative 0.1, 0.25; 1+ 0.32, 0.45; 2+ 0.55, 0.65; 3+ 0.75, 0.9.
LEVELS = (0.1, 0.25, 0.32, 0.45, 0.55, 0.65, 0.75, 0.9)
SPACING = 24  # px at 1 um/px: one nucleus (radius 4 um) per 24 um square


def test_percent_positive_and_h_score_known_answer():
    s = score_marker("Ki67", [0.1, 0.2, 0.3, 0.49, 0.5, 0.69, 0.7, 1.0, 0.0, 0.8], 0.3, (0.5, 0.7))
    # negative 0.1 0.2 0.0 | 1+ 0.3 0.49 | 2+ 0.5 0.69 | 3+ 0.7 1.0 0.8 (an edge takes the upper bin)
    assert s.n_cells == 10
    assert (s.percent_weak, s.percent_moderate, s.percent_strong) == pytest.approx((20, 20, 30))
    assert s.percent_positive == pytest.approx(70.0)
    assert s.h_score == pytest.approx(20 * 1 + 20 * 2 + 30 * 3)  # 150
    assert s.mean_level == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.49, 0.5, 0.69, 0.7, 1.0, 0.0, 0.8]))
    assert score_marker("HER2", [1.0] * 4, 0.35, (0.5, 0.7)).h_score == pytest.approx(300.0)
    assert score_marker("HER2", [0.0] * 4, 0.35, (0.5, 0.7)).h_score == 0.0
    empty = score_marker("HER2", [], 0.35, (0.5, 0.7))
    assert empty.n_cells == 0 and empty.percent_positive is None and empty.h_score is None
    with pytest.raises(ConditionError, match="threshold < moderate < strong"):
        intensity_class(np.array([0.5]), 0.6, (0.5, 0.7))


def test_bins_come_from_the_catalogue_with_a_documented_default(tmp_path):
    cat = StainCatalogue.load()
    assert {intensity_bins_of(t) for t in cat if t.kind == "marker"} == {(0.5, 0.7)}
    assert all(t.positivity_threshold < t.intensity_bins[0] for t in cat if t.kind == "marker")
    old = tmp_path / "catalogue.json"  # a model folder's catalogue from before the field
    old.write_text(json.dumps({"targets": [{"name": "Ki67", "kind": "marker"},
                                           {"name": "PanCK", "kind": "marker"}]}))
    legacy = StainCatalogue.load(old)
    assert intensity_bins_of(legacy.get("Ki67")) == cat.get("Ki67").intensity_bins
    assert intensity_bins_of(legacy.get("PanCK")) == DEFAULT_INTENSITY_BINS
    cat.register("X", kind="marker", positivity_threshold=0.2, intensity_bins=[0.4, 0.6])
    assert StainCatalogue.load(_saved(cat, tmp_path)).get("X").intensity_bins == (0.4, 0.6)
    for bad in ([0.6, 0.4], [0.25, 0.6], [0.5, 1.2], "strong"):
        with pytest.raises(ConditionError, match="intensity_bins"):
            cat.register(f"Y{bad}", kind="marker", positivity_threshold=0.3, intensity_bins=bad)


def _saved(cat: StainCatalogue, tmp_path) -> str:
    path = tmp_path / "saved.json"
    cat.save(path)
    return str(path)


def synthetic_tissue(n: int = 8) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """An n x n grid of round hematoxylin nuclei (r = 4 um) on eosin at 1 um/px, and a marker map
    constant over each nucleus's 24 um square, cycling through LEVELS; and the nuclei centres."""
    size = SPACING * n
    yy, xx = np.mgrid[:size, :size]
    hed = np.zeros((size, size, 3))
    hed[..., 1] = 0.03
    marker = np.zeros((size, size), np.float32)
    centres = []
    for k in range(n * n):
        i, j = divmod(k, n)
        cy, cx = i * SPACING + SPACING // 2, j * SPACING + SPACING // 2
        hed[..., 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 0.2
        marker[i * SPACING : (i + 1) * SPACING, j * SPACING : (j + 1) * SPACING] = LEVELS[k % 8]
        centres.append((cx, cy))
    return np.clip(hed2rgb(hed) * 255, 0, 255).round().astype(np.uint8), marker, centres


@pytest.mark.parametrize("window", [2048, 50])
def test_rendered_cells_give_the_exact_scores_of_synthetic_tissue(window, monkeypatch):
    """64 nuclei with known levels: every cell found once (also across 50 px windows with their
    40 px margins), at its centre, with its square's level; 75% positive, H-score 150; the cells
    are segmented once per window for both markers."""
    import mupd.render

    he, marker, centres = synthetic_tissue()
    calls = []
    segment = mupd.render.segment_cells_hed
    monkeypatch.setattr(mupd.render, "segment_cells_hed", lambda *a, **k: calls.append(1) or segment(*a, **k))
    maps = [MarkerMap("Ki67", marker, "nuclear", 0.3), MarkerMap("HER2", 1 - marker, "membranous", 0.3)]
    outs, cells = render_ihc_cells(he, maps, 1.0, window=window)
    windows = -(-he.shape[0] // window) * -(-he.shape[1] // window)
    assert len(calls) == windows
    assert len(cells) == 64
    # centres in pixel-edge coordinates: the disk around pixel centre (cx, cy) is centred on +0.5
    got = {(round(x - 0.5), round(y - 0.5)) for x, y in cells.centroids}
    assert got == set(centres)
    order = np.lexsort((cells.centroids[:, 0], cells.centroids[:, 1]))  # row by row, as built
    np.testing.assert_allclose(cells.levels["Ki67"][order], np.tile(LEVELS, 8), atol=1e-6)
    ki67, her2 = score_cells(cells, [_target("Ki67", 0.3), _target("HER2", 0.3)])
    assert (ki67.n_cells, ki67.percent_positive, ki67.h_score) == (64, 75.0, 150.0)
    assert ki67.mean_level == pytest.approx(np.mean(LEVELS), abs=1e-6)
    # 1 - level: 0.9 0.75 0.68 0.55 | 0.45 0.35 0.25 0.1 -> 2 strong, 2 moderate, 2 weak, 2 negative
    assert (her2.percent_positive, her2.h_score) == (75.0, 150.0)
    # a cell's outline encloses its centre and its area is the disk grown by 4 um (~ pi 8^2)
    for i in range(0, 64, 9):
        ring = Polygon(cells.outline(i))
        assert ring.contains(shapely.Point(*cells.centroids[i]))
        assert ring.area == pytest.approx(cells.areas_um2[i], rel=0.1)
    assert np.all((cells.areas_um2 > 150) & (cells.areas_um2 < 215))
    assert outs[0].shape == he.shape and outs[0].dtype == np.uint8


def _target(name: str, threshold: float):
    from mupd.models.catalogue import StainTarget

    return StainTarget(name, "marker", compartment="nuclear", positivity_threshold=threshold,
                       intensity_bins=(0.5, 0.7))


@pytest.fixture(scope="module")
def region():
    """Ki67 + HER2 over a polygon with a square hole on CMU-1 (0.499 um/px, 1 um/px model)."""
    slide = ArraySlide(_cmu(300, 600, 600, 0.499), 0.499)
    polygon = [(40.0, 40.0), (560.0, 50.0), (570.0, 560.0), (30.0, 540.0)]
    hole = [(200.0, 380.0), (400.0, 380.0), (400.0, 520.0), (200.0, 520.0)]
    translator = RegionTranslator(TileContextPipeline(tile_size=128, mpp=1.0), batch_size=4,
                                  tissue_only=False)
    whole = translator(slide, ["Ki67", "HER2"], polygon=polygon)
    cut = translator(slide, ["Ki67", "HER2"], polygon=polygon, holes=[hole])
    return whole, cut, polygon, hole


def test_region_cells_are_those_of_the_polygon_less_its_holes(region):
    whole, cut, polygon, hole = region
    inside = Polygon(polygon, [hole])
    assert len(cut.cells) > 10 and len(whole.cells) > len(cut.cells)
    assert shapely.contains_xy(inside, cut.cells.centroids[:, 0], cut.cells.centroids[:, 1]).all()
    in_hole = shapely.contains_xy(Polygon(hole), whole.cells.centroids[:, 0], whole.cells.centroids[:, 1])
    assert in_hole.sum() == len(whole.cells) - len(cut.cells)
    # the scores are the read-out of exactly these cells' levels, per marker
    assert [s.marker for s in cut.scores] == ["Ki67", "HER2"]
    for s in cut.scores:
        cat = StainCatalogue.load().get(s.marker)
        assert s == score_marker(s.marker, cut.cells.levels[s.marker], cat.positivity_threshold,
                                 cat.intensity_bins)
    # cell outlines are in level-0 px: around their centre, inside the region's box
    x, y, w, h = cut.region.box
    assert cut.cells.outline_xy[:, 0].min() >= x - 1 and cut.cells.outline_xy[:, 0].max() <= x + w + 1
    assert cut.cells.outline_xy[:, 1].min() >= y - 1 and cut.cells.outline_xy[:, 1].max() <= y + h + 1


def test_scores_csv_and_qupath_geojson_read_back(region, tmp_path):
    _, cut, polygon, hole = region
    out = write_translation(cut, tmp_path / "ROI")
    assert {"scores.csv", "scores-Ki67.geojson", "scores-HER2.geojson"} <= {p.name for p in out.iterdir()}
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["marker"] for r in rows] == ["Ki67", "HER2"] and {r["region"] for r in rows} == {"ROI"}
    assert all("predicted" in k for k in rows[0] if k.endswith("%") or "H-score" in k or "level" in k)
    for row, s in zip(rows, cut.scores):
        assert int(row["cells"]) == s.n_cells
        assert float(row["predicted positive %"]) == pytest.approx(s.percent_positive, rel=1e-5)
        assert float(row["predicted H-score"]) == pytest.approx(s.h_score, rel=1e-5)
        assert float(row["predicted mean level"]) == pytest.approx(s.mean_level, rel=1e-5)
    doc = json.loads((out / "scores-Ki67.geojson").read_text())
    kinds = [f["properties"]["objectType"] for f in doc["features"]]
    assert kinds == ["annotation"] + ["detection"] * len(cut.cells)
    ki67 = cut.scores[0]
    (annotation,) = read_geojson(out / "scores-Ki67.geojson")
    assert np.allclose(annotation.polygon, polygon) and np.allclose(annotation.holes, [hole])
    m = annotation.measurements
    assert m["Predicted Ki67: Num Detections"] == ki67.n_cells
    assert m["Predicted Ki67: Positive %"] == pytest.approx(ki67.percent_positive)
    assert m["Predicted Ki67: H-score"] == pytest.approx(ki67.h_score)
    cells = read_geojson(out / "scores-Ki67.geojson", object_types=("detection",))
    positive = [c for c in cells if c.classification == "Positive"]
    assert len(cells) == ki67.n_cells
    assert len(positive) == round(ki67.percent_positive * ki67.n_cells / 100)
    assert {c.color for c in positive} <= {POSITIVE_COLOR}
    assert {c.color for c in cells if c.classification == "Negative"} <= {NEGATIVE_COLOR}
    levels = np.array([c.measurements["Predicted Ki67: Level"] for c in cells])
    np.testing.assert_allclose(levels, cut.cells.levels["Ki67"], rtol=1e-6)


def test_scores_and_cells_travel_over_the_wire(region):
    _, cut, _, _ = region
    layer = StainLayer("Ki67", "marker", np.zeros((4, 4), np.float32),
                       Placement((0, 0, 4, 4), (1.0, 1.0), (0.0, 0.0)))
    sent = TranslateResult([layer], n_tiles=3, seconds=1.5, scores=cut.scores, cells=cut.cells)
    back = wire.decode_translate_result(wire.encode_translate_result(sent))
    assert back.scores == cut.scores
    for name, a in cut.cells.arrays()[1].items():
        np.testing.assert_array_equal(back.cells.arrays()[1][name], a, err_msg=name)
    assert list(back.cells.levels) == ["Ki67", "HER2"]
    # a result without cells (no rendering) has none; a payload whose cells disagree is refused
    plain = wire.decode_translate_result(wire.encode_translate_result(TranslateResult([layer])))
    assert plain.scores == [] and plain.cells is None
    broken = CellReadout(cut.cells.centroids, cut.cells.areas_um2, cut.cells.outline_xy,
                         cut.cells.outline_offsets[:-1], dict(cut.cells.levels))
    with pytest.raises(wire.WireError, match="cell read-out arrays disagree"):
        wire.decode_translate_result(wire.encode_translate_result(
            TranslateResult([layer], scores=cut.scores, cells=broken)))
