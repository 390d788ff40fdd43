"""Outputs register with the source slide: placement (scale, translate in um) maps every output
pixel centre onto the right level-0 pixels, checked on the real CMU slide at an odd offset."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from skimage.color import rgb2hed
from skimage.filters import gaussian
from skimage.registration import phase_cross_correlation
from skimage.transform import AffineTransform, warp

from mupd.io import open_slide
from mupd.regions.outputs import write_translation
from mupd.regions.plan import Placement
from mupd.regions.translate import RegionTranslator
from support_slides import TileContextPipeline, cmu_slide_path

BOX = (517, 333, 640, 512)  # odd level-0 offset, not a multiple of anything


def reference_from_placement(slide, scale_um, translate_um, shape, shift_px=(0.0, 0.0)) -> np.ndarray:
    """The slide resampled (skimage.warp, independent of mupd.regions) onto the grid the placement
    claims: output pixel (r, c) centre = translate + (r, c) * scale um = that / mpp level-0 px."""
    mx, my = slide.mpp
    x0, y0 = int(translate_um[1] / mx) - 16, int(translate_um[0] / my) - 16
    w, h = int(shape[1] * scale_um[1] / mx) + 32, int(shape[0] * scale_um[0] / my) + 32
    crop = slide.read_region((x0, y0), (w, h)).astype(np.float32) / 255.0
    factor = scale_um[1] / mx
    crop = gaussian(crop, sigma=(factor - 1) / 2, channel_axis=-1, preserve_range=True)

    inverse = AffineTransform(matrix=np.array([  # output (col, row) -> crop (col, row)
        [scale_um[1] / mx, 0, translate_um[1] / mx - x0 + shift_px[0]],
        [0, scale_um[0] / my, translate_um[0] / my - y0 + shift_px[1]],
        [0, 0, 1]]))
    out = warp(crop, inverse, output_shape=shape, order=1)
    return (out * 255).round().astype(np.uint8)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    return rgb2hed(rgb)[8:-8, 8:-8, 0]  # interior: the reference crop has margins, not the output


@pytest.fixture(scope="module")
def translated(shared_data):
    slide = open_slide(cmu_slide_path(shared_data))
    pipe = TileContextPipeline(tile_size=128, mpp=1.0)
    result = RegionTranslator(pipe, batch_size=4, tissue_only=False)(slide, ["Ki67", "H&E"], box=BOX)
    return slide, result


def test_placement_is_napari_pixel_centres():
    placement = Placement.of((517, 333, 10, 10), (0.5, 0.5), 2.0)
    scale, translate = placement.scale_um, placement.translate_um
    # output pixel 0 spans level-0 x 517..521 (edges); its centre 519 (edge) = pixel 518.5 -> 259.25 um
    assert scale == (2.0, 2.0)
    assert translate == pytest.approx((333 * 0.5 - 0.25 + 1.0, 517 * 0.5 - 0.25 + 1.0))


def test_rendered_ihc_keeps_source_hematoxylin_at_zero_shift(translated):
    slide, result = translated
    ihc = next(l for l in result.layers if l.name == "IHC-Ki67").data
    where = result.region.placement
    ref = reference_from_placement(slide, where.scale_um, where.translate_um, ihc.shape[:2])
    factor = where.mpp / slide.mpp[0]
    shift, _, _ = phase_cross_correlation(hematoxylin(ref), hematoxylin(ihc), upsample_factor=20)
    assert np.abs(shift).max() * factor < 0.5, f"offset {shift * factor} level-0 px"
    # the identity (H&E) output *is* the slide on the claimed grid: blending and tiling add
    # nothing (a half level-0 pixel shift already costs 2.2 grey levels on this region)
    he = next(l for l in result.layers if l.name == "H&E").data
    assert np.abs(he.astype(int) - ref)[8:-8, 8:-8].mean() < 0.2
    shift, _, _ = phase_cross_correlation(hematoxylin(ref), hematoxylin(he), upsample_factor=20)
    assert np.abs(shift).max() * factor < 0.5
    off = reference_from_placement(slide, where.scale_um, where.translate_um, ihc.shape[:2], (1.0, 0.0))
    shift, _, _ = phase_cross_correlation(hematoxylin(off), hematoxylin(ihc), upsample_factor=20)
    assert shift[1] * factor == pytest.approx(-1.0, abs=0.35) and abs(shift[0] * factor) < 0.35


def test_written_ome_zarr_carries_placement_channels_and_provenance(translated, tmp_path):
    slide, result = translated
    where = result.region.placement
    out = write_translation(result, tmp_path / "out", source=str(slide.path))
    assert sorted(p.name for p in out.iterdir()) == ["HandE.ome.zarr", "IHC-Ki67.ome.zarr", "Ki67.ome.zarr",
                                                 "scores-Ki67.geojson", "scores.csv"]
    ki67 = dict(zarr.open_group(str(out / "Ki67.ome.zarr"), mode="r").attrs)
    ms = ki67["ome"]["multiscales"][0]["datasets"]
    for i, ds in enumerate(ms):
        scale, trans = ds["coordinateTransformations"]
        assert scale["scale"][1:] == pytest.approx([where.mpp * 2**i] * 2)
        # level i pixel 0 centre = level-0 centre + (2**i - 1) / 2 output pixels
        want = np.asarray(where.translate_um) + (2**i - 1) / 2 * where.mpp
        assert trans["translation"][1:] == pytest.approx(list(want))
    assert [c["label"] for c in ki67["ome"]["omero"]["channels"]] == ["Ki67"]
    assert ki67["ome"]["omero"]["channels"][0]["color"] == "FF0000"  # the catalogue's red
    assert ki67["mupd"]["source_box_level0_xywh"] == list(BOX)
    ihc = dict(zarr.open_group(str(out / "IHC-Ki67.ome.zarr"), mode="r").attrs)["mupd"]
    assert "rendered as DAB" in ihc["rendered_from"] and "predicted Ki67 intensity" in ihc["rendered_from"]
    back = open_slide(out / "IHC-Ki67.ome.zarr")
    assert np.array_equal(np.asarray(back.levels[0]), next(l.data for l in result.layers
                                                           if l.name == "IHC-Ki67"))
