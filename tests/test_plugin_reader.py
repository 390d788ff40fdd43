"""Each kind of real slide through the plugin's reader in a real napari viewer, down to the pixels drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plugin_fixtures import drawn_stats, needs_display

pytestmark = [pytest.mark.gui, needs_display]


@pytest.fixture
def warnings_shown(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages the plugin sends to napari's notification area."""
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", shown.append)
    return shown


def _open(viewer, path: Path) -> list:
    layers = viewer.open(path, plugin="napari-mupd")
    viewer.reset_view()
    return layers


def _assert_drawn(viewer, min_std: float) -> None:
    std, covered = drawn_stats(viewer.screenshot(canvas_only=True, flash=False))
    assert std > min_std, f"screenshot looks flat (std {std:.1f})"
    assert covered > 0.3, f"only {covered:.0%} of the canvas shows the slide"


def _single_rgb(layers: list, name: str):
    assert len(layers) == 1
    layer = layers[0]
    assert layer.rgb and layer.name == name
    return layer


@pytest.mark.parametrize("relpath, name, levels", [
    ("wsi/CMU-1-Small-Region.svs", "CMU-1-Small-Region", 1),
    ("wsi/derived/CMU-1-Small-Region.pyramid.ome.tif", "CMU-1-Small-Region.pyramid", 3),
])
def test_calibrated_rgb_slides(make_napari_viewer, shared_data: Path, relpath: str, name: str,
                               levels: int, warnings_shown: list[str]) -> None:
    viewer = make_napari_viewer(show=True)
    layer = _single_rgb(_open(viewer, shared_data / relpath), name)
    assert len(layer.level_shapes) == levels and layer.multiscale == (levels > 1)
    assert tuple(layer.level_shapes[0][:2]) == (2967, 2220)
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.metadata["mpp_known"] and layer.metadata["slide_path"] == str(shared_data / relpath)
    assert warnings_shown == []
    _assert_drawn(viewer, min_std=40)


def test_jpeg2000_svs_without_mpp_is_flagged(make_napari_viewer, shared_data: Path,
                                             warnings_shown: list[str]) -> None:
    viewer = make_napari_viewer(show=True)
    layer = _single_rgb(_open(viewer, shared_data / "wsi/TCGA-CR-7395-01A-01-TS1.svs"), "TCGA-CR-7395-01A-01-TS1")
    assert [tuple(s[:2]) for s in layer.level_shapes] == [(3567, 4443), (1783, 2221)]
    np.testing.assert_allclose(layer.scale, (1.0, 1.0))
    assert [str(u) for u in layer.units] == ["pixel", "pixel"]
    assert layer.metadata["mpp_known"] is False and layer.metadata["mpp"] is None
    assert len(warnings_shown) == 1 and "TCGA-CR-7395-01A-01-TS1.svs" in warnings_shown[0]
    _assert_drawn(viewer, min_std=40)


def test_qptiff_opens_as_additive_channels(make_napari_viewer, shared_data: Path) -> None:
    viewer = make_napari_viewer(show=True)
    layers = _open(viewer, shared_data / "mif/small_vectra.qptiff")
    assert [layer.name for layer in layers] == ["DAPI", "FITC", "Cy3"]
    assert [layer.colormap.name for layer in layers] == ["blue", "green", "yellow"]
    for layer in layers:
        assert not layer.rgb and layer.blending == "additive"
        assert tuple(layer.contrast_limits) == (0.0, 255.0)
        assert tuple(layer.level_shapes[0]) == (1440, 1920)
        np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    # the channels are really different planes of the file, not one plane three times
    thumbs = [np.asarray(layer.data[::16, ::16]) for layer in layers]
    assert not np.array_equal(thumbs[0], thumbs[1]) and not np.array_equal(thumbs[1], thumbs[2])
    std, covered = drawn_stats(viewer.screenshot(canvas_only=True, flash=False))
    assert std > 5 and covered > 0.3, (std, covered)  # dim fluorescence at full uint8 range, but drawn


def test_her2st_jpeg(make_napari_viewer, shared_data: Path, warnings_shown: list[str]) -> None:
    viewer = make_napari_viewer(show=True)
    layer = _single_rgb(_open(viewer, shared_data / "st/her2st/images/B4_HE.jpg"), "B4_HE")
    assert tuple(layer.level_shapes[0][:2]) == (9923, 9272) and layer.multiscale
    assert layer.metadata["format"] == "image" and not layer.metadata["mpp_known"]
    assert len(warnings_shown) == 1
    _assert_drawn(viewer, min_std=40)


def test_dicom_folder_opens_as_a_calibrated_pyramid(make_napari_viewer, tmp_path: Path,
                                                    warnings_shown: list[str]) -> None:
    """A DICOM WSI written from the sample slide: the folder, or all its .dcm files at once, is one layer."""
    import tiffslide

    from dicom_wsi import write_dicom_wsi
    from mupd.io.samples import sample_slide_path
    from napari_mupd._reader import napari_get_reader

    with tiffslide.TiffSlide(str(sample_slide_path())) as ts:
        pixels = ts.read_region((0, 0), 0, ts.dimensions, as_array=True)
    folder = tmp_path / "CMU-1-dicom"
    files = [str(f) for f in write_dicom_wsi(folder, pixels, 0.499)]
    viewer = make_napari_viewer(show=True)
    layer = _single_rgb(_open(viewer, folder), "CMU-1-dicom")
    assert layer.multiscale and [tuple(s[:2]) for s in layer.level_shapes][:2] == [(2967, 2220), (1484, 1110)]
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    assert layer.metadata["format"] == "dicom" and layer.metadata["slide_path"] == str(folder)
    assert warnings_shown == []
    _assert_drawn(viewer, min_std=40)
    read = napari_get_reader(files)  # napari's stack of every instance file of the slide
    assert read is not None and len(read(files)) == 1
