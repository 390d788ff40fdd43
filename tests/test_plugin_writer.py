"""Writers, round-tripped through napari's own save: pixels, mpp, channel names/colours and polygons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from napari.components import ViewerModel
from skimage import color, data

from mupd.errors import MuPDError, OutputExistsError
from mupd.io import open_slide, read_geojson


@pytest.fixture
def viewer() -> ViewerModel:
    """A model-only viewer with the installed plugins registered, as napari does at start-up."""
    from npe2 import PluginManager

    PluginManager.instance().discover()
    return ViewerModel()


@pytest.mark.parametrize("name", ["ihc.zarr", "ihc.ome.tif"])
def test_rgb_layer_round_trip(viewer: ViewerModel, tmp_path: Path, name: str) -> None:
    ihc = data.immunohistochemistry()
    viewer.add_image(ihc, rgb=True, name="ihc", scale=(0.25, 0.5), units=("um", "um"))
    saved = viewer.layers.save(str(tmp_path / name), plugin="napari-mupd")
    assert saved == [str(tmp_path / name)]
    slide = open_slide(tmp_path / name)
    assert slide.is_rgb and slide.mpp == pytest.approx((0.5, 0.25))
    np.testing.assert_array_equal(np.asarray(slide.levels[0]), ihc)
    # and back into napari through the plugin's reader, at the same place on screen
    (layer,) = viewer.open(tmp_path / name, plugin="napari-mupd")
    assert layer.rgb and tuple(layer.scale) == pytest.approx((0.25, 0.5))


@pytest.mark.parametrize("name", ["hed.zarr", "hed.ome.tiff"])
def test_channel_layers_become_one_multichannel_file(viewer: ViewerModel, tmp_path: Path, name: str) -> None:
    """Hematoxylin / eosin / DAB planes of a real IHC image as three layers -> one 3-channel image."""
    from napari.utils.colormaps import Colormap

    hed = color.rgb2hed(data.immunohistochemistry()).astype(np.float32)
    maps = ["blue", Colormap([[0, 0, 0, 1], [1, 0.5, 0, 1]], name="dab-brown"), "magenta"]
    for i, (label, cmap) in enumerate(zip(["Hematoxylin", "Eosin", "DAB"], maps)):
        viewer.add_image(hed[..., i], name=label, colormap=cmap, blending="additive",
                         scale=(0.5, 0.5), units=("um", "um"))
    viewer.layers.save(str(tmp_path / name), plugin="napari-mupd")
    slide = open_slide(tmp_path / name)
    assert slide.channel_names == ["Hematoxylin", "Eosin", "DAB"]
    assert [str(c).upper() for c in slide.channel_colors] == ["0000FF", "FF8000", "FF00FF"]
    assert slide.mpp == pytest.approx((0.5, 0.5)) and not slide.is_rgb
    np.testing.assert_array_equal(np.asarray(slide.levels[0]), hed)


def test_qptiff_channels_survive_a_save(viewer: ViewerModel, tmp_path: Path, shared_data: Path) -> None:
    layers = viewer.open(shared_data / "mif/small_vectra.qptiff", plugin="napari-mupd")
    viewer.layers.save(str(tmp_path / "vectra.ome.tif"), plugin="napari-mupd")
    reopened = ViewerModel().open(tmp_path / "vectra.ome.tif", plugin="napari-mupd")
    assert [(x.name, x.colormap.name) for x in reopened] == [(x.name, x.colormap.name) for x in layers]
    for a, b in zip(layers, reopened):
        assert b.multiscale  # written as a pyramid
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data[0]))
        assert tuple(b.scale) == pytest.approx((0.5, 0.5))


def test_existing_outputs_are_never_replaced(viewer: ViewerModel, tmp_path: Path) -> None:
    viewer.add_image(data.immunohistochemistry(), rgb=True, name="ihc", scale=(0.5, 0.5), units=("um", "um"))
    viewer.add_shapes([np.array([[0, 0], [0, 9], [9, 9], [9, 0]])], shape_type="rectangle", name="roi")
    tif = tmp_path / "kept.ome.tif"
    tif.write_bytes(b"user data")
    zarr_dir = tmp_path / "kept.zarr"
    zarr_dir.mkdir()
    (zarr_dir / "note.txt").write_text("user data")
    geo = tmp_path / "kept.geojson"
    geo.write_text("{}")
    for path, layer in ((tif, "ihc"), (zarr_dir, "ihc"), (geo, "roi")):
        viewer.layers.selection = {viewer.layers[layer]}
        with pytest.raises(OutputExistsError, match=path.name):
            viewer.layers.save(str(path), selected=True, plugin="napari-mupd")
    assert tif.read_bytes() == b"user data" and geo.read_text() == "{}"
    assert [p.name for p in zarr_dir.iterdir()] == ["note.txt"]


def test_bad_image_selections_are_refused_with_the_layer_named(viewer: ViewerModel, tmp_path: Path) -> None:
    ihc = data.immunohistochemistry()
    viewer.add_image(ihc, rgb=True, name="uncalibrated")  # napari default: scale 1, units pixel
    with pytest.raises(MuPDError, match="'uncalibrated' has no physical pixel size"):
        viewer.layers.save(str(tmp_path / "a.zarr"), plugin="napari-mupd")
    viewer.layers.clear()
    viewer.add_image(ihc, rgb=True, name="he", scale=(0.5, 0.5), units=("um", "um"))
    viewer.add_image(ihc[..., 0], name="dapi", scale=(0.5, 0.5), units=("um", "um"))
    with pytest.raises(MuPDError, match="RGB layer is saved on its own"):
        viewer.layers.save(str(tmp_path / "b.zarr"), plugin="napari-mupd")
    viewer.layers.clear()
    viewer.add_image(ihc[..., 0], name="dapi", scale=(0.5, 0.5), units=("um", "um"))
    viewer.add_image(ihc[:256, :, 1], name="cd8", scale=(0.5, 0.5), units=("um", "um"))
    with pytest.raises(MuPDError, match="sizes"):
        viewer.layers.save(str(tmp_path / "c.zarr"), plugin="napari-mupd")
    assert not list(tmp_path.iterdir())


def test_shapes_become_level0_pixel_polygons(viewer: ViewerModel, tmp_path: Path) -> None:
    """A shapes layer drawn over a 0.499 um/px slide placed at (10, 20) um; GeoJSON holds slide pixels."""
    mpp, translate = 0.499, np.array([10.0, 20.0])
    rect = np.array([[100, 200], [100, 400], [300, 400], [300, 200]], float)  # (y, x) data coords
    box = np.array([[500, 600], [500, 1000], [700, 1000], [700, 600]], float)  # ellipse bounding box
    poly = np.array([[50, 50], [80, 120], [20, 140]], float)
    layer = viewer.add_shapes([rect, box, poly], shape_type=["rectangle", "ellipse", "polygon"],
                              scale=(mpp, mpp), translate=translate, units=("um", "um"),
                              features={"name": ["tumour", "stroma", "gland"],
                                        "classification": ["Tumor", "Stroma", None]},
                              edge_color="#00ff00", name="rois")
    path = tmp_path / "rois.geojson"
    viewer.layers.save(str(path), selected=False, plugin="napari-mupd")
    regions = read_geojson(path)
    assert [(r.name, r.classification, r.shape) for r in regions] == [
        ("tumour", "Tumor", "rectangle"), ("stroma", "Stroma", "ellipse"), ("gland", None, "polygon")]
    assert regions[0].color == (0, 255, 0)
    offset = translate / mpp  # the layer's placement, in slide pixels
    expected_rect = [(x + offset[1], y + offset[0]) for y, x in rect]
    np.testing.assert_allclose(regions[0].polygon, expected_rect)
    np.testing.assert_allclose(regions[2].polygon, [(x + offset[1], y + offset[0]) for y, x in poly])
    xy = np.asarray(regions[1].polygon)
    cx, cy, rx, ry = 800 + offset[1], 600 + offset[0], 200, 100
    np.testing.assert_allclose(((xy[:, 0] - cx) / rx) ** 2 + ((xy[:, 1] - cy) / ry) ** 2, 1.0, atol=1e-9)
    # an ROI layer that knows its slide's mpp (set by the plugin) converts um to that slide's pixels
    layer.metadata["mpp"] = (mpp / 2, mpp / 2)
    viewer.layers.save(str(tmp_path / "half.geojson"), selected=False, plugin="napari-mupd")
    np.testing.assert_allclose(read_geojson(tmp_path / "half.geojson")[0].polygon, np.array(expected_rect) * 2)


def test_shapes_over_a_placed_slide_save_in_its_pixels(viewer: ViewerModel, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide layer at an odd translate (and scale); shapes drawn over it as napari draws them
    (the slide's scale, no translate) save in that slide's level-0 pixels, not their own."""
    mpp, origin = 0.499, (123.4, -56.7)
    slide = viewer.add_image(np.zeros((800, 1000), np.uint8), name="slide", scale=(mpp, mpp),
                             translate=origin, units=("um", "um"),
                             metadata={"slide_path": str(tmp_path / "slide.svs"), "mpp": (mpp, mpp),
                                       "level_dimensions": [(1000, 800)]})
    monkeypatch.setattr("napari.current_viewer", lambda: viewer)  # what napari's Viewer gives
    pixels = np.array([[100, 200], [100, 400], [300, 400], [300, 200]], float)  # (y, x) on the slide
    world = np.array([slide.data_to_world(p) for p in pixels])
    shapes = viewer.add_shapes([world / mpp], shape_type="rectangle", scale=(mpp, mpp), units=("um", "um"),
                               name="rois")
    viewer.layers.selection.active = shapes
    viewer.layers.save(str(tmp_path / "rois.geojson"), selected=True, plugin="napari-mupd")
    np.testing.assert_allclose(read_geojson(tmp_path / "rois.geojson")[0].polygon, pixels[:, ::-1], atol=1e-9)


def test_lines_and_paths_are_not_annotations(viewer: ViewerModel, tmp_path: Path) -> None:
    viewer.add_shapes([np.array([[0, 0], [5, 5], [9, 0]])], shape_type="path", name="scribble")
    with pytest.raises(MuPDError, match="shape 0 of layer 'scribble' is a path"):
        viewer.layers.save(str(tmp_path / "x.geojson"), plugin="napari-mupd")
    assert not (tmp_path / "x.geojson").exists()


def test_a_placed_layer_reopens_where_it_was(viewer: ViewerModel, tmp_path: Path) -> None:
    """A virtual stain saved from napari keeps its place over the slide (NGFF translation)."""
    marker = np.linspace(0, 1, 60 * 80, dtype=np.float32).reshape(60, 80)
    viewer.add_image(marker, name="HER2 [ROI 1]", colormap="magenta", scale=(1.0, 1.0),
                     translate=(498.75, 399.45), units=("um", "um"))
    viewer.layers.save(str(tmp_path / "her2.zarr"), plugin="napari-mupd")
    with open_slide(tmp_path / "her2.zarr") as slide:
        assert slide.origin_um == pytest.approx((498.75, 399.45))
    (layer,) = viewer.open(tmp_path / "her2.zarr", plugin="napari-mupd")
    assert tuple(layer.translate) == pytest.approx((498.75, 399.45))
    np.testing.assert_allclose(np.asarray(layer.data), marker)
