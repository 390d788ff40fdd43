"""Stain normalisation at inference (mupd.stain_norm) and image-to-image (strength) on regions."""

from __future__ import annotations

import numpy as np
import pytest

from mupd.errors import ConditionError, MuPDError
from mupd.io import open_slide
from mupd.regions.source import ArraySlide, read_box
from mupd.regions.translate import RegionTranslator
from mupd.stain_norm import check_method, fit_normalization, load_reference, stain_stats
from test_slides_seams import border_energy_ratio, overlap_band_texture  # noqa: F401
from support_slides import cmu_slide_path, model_pipeline

BOX = (200, 400, 1600, 1600)


@pytest.fixture(scope="module")
def cmu():
    return open_slide(cmu_slide_path())


@pytest.fixture(scope="module")
def region(cmu) -> np.ndarray:
    return read_box(cmu, BOX[0], BOX[1], 400, 400, 2.0)


def _restained(rgb: np.ndarray) -> np.ndarray:
    """The same tissue as another lab might stain it: hematoxylin darker, eosin paler."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb) * np.array([1.6, 0.6, 1.0])
    return (hed2rgb(hed) * 255).clip(0, 255).round().astype(np.uint8)


def test_methods_and_bad_input_are_named():
    assert check_method(None) is None and check_method("none") is None
    assert check_method("Macenko") == "macenko"
    with pytest.raises(ConditionError, match="stain normalisation 'vahadane' unknown"):
        check_method("vahadane")
    glass = np.full((64, 64, 3), 245, np.uint8)
    with pytest.raises(ConditionError, match=r"glass region has 0 stained pixels"):
        fit_normalization("macenko", glass, what="glass region")
    with pytest.raises(MuPDError, match="stain reference .*nothing.png: not a readable image"):
        load_reference("macenko", "/nothing.png")


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_restained_region_is_brought_back_towards_its_own_stain(region, method, tmp_path):
    """Normalising a re-stained copy onto the original's stain lands far closer to the original
    than the re-stained copy is; normalising the original onto itself changes little."""
    from PIL import Image

    Image.fromarray(region).save(tmp_path / "reference.png")
    other = _restained(region)
    back = fit_normalization(method, other, tmp_path / "reference.png")(other)
    tissue = ~np.any(-np.log((region.astype(float) + 1) / 240) < 0.15, axis=-1)
    err = lambda a: np.abs(a.astype(float) - region.astype(float))[tissue].mean()  # noqa: E731
    # measured on this region (tissue pixels, grey levels): re-stained 13.2; back by Macenko
    # 3.6, by Reinhard 8.1; the original onto itself 2.6 / 0.0
    assert err(back) < 0.7 * err(other), (err(back), err(other))
    same = fit_normalization(method, region, tmp_path / "reference.png")(region)
    assert err(same) < 3.0
    assert stain_stats(method, back).keys() == stain_stats(method, region).keys()


def test_region_translation_normalises_once_so_tiles_agree(cmu):
    """The map is fitted once on the region's preview, so a tile's normalised pixels do not
    depend on which tile read them; the layer says what was done; the bundled reference is the
    training stain."""
    pipe = model_pipeline()
    translator = RegionTranslator(pipe, batch_size=8, tissue_only=False)
    plan = translator.plan(cmu, ["HER2"], box=BOX, stain_norm="macenko")
    assert plan.stain_norm is not None and plan.stain_norm.method == "macenko"
    assert plan.stain_norm.target == load_reference("macenko")
    result = translator(cmu, ["HER2"], box=BOX, stain_norm="macenko", render_brightfield=False)
    meta = result.layers[0].metadata["stain_normalization"]
    assert meta["method"] == "macenko" and meta["source"]["stain_matrix"]
    plain = translator(cmu, ["HER2"], box=BOX, render_brightfield=False)
    assert "stain_normalization" not in plain.layers[0].metadata
    assert not np.allclose(np.asarray(result.layers[0].data), np.asarray(plain.layers[0].data))


def test_image_to_image_strength_keeps_the_source_by_degree(cmu, region):
    """On tissue tiles (on glass the codec alone is ~38 grey levels off, so no strength can be
    seen there). Measured, mean |output - source|: codec only 16.4; strength 0.2 / 0.5 / 0.9:
    20.3 / 21.7 / 34.0 (the model bundled before: 22.6 / 24.2 / 39.1)."""
    from mupd.data.tissue import is_tissue

    pipe = model_pipeline()
    T = pipe.tile_size
    grid = [region[y:y + T, x:x + T] for y in range(0, 3 * T, T) for x in range(0, 3 * T, T)]
    tiles = np.stack([t for t in grid if is_tissue(t)][:2])
    assert len(tiles) == 2
    zero = pipe.translate(tiles, ["H&E"], strength=0.0)["H&E"]
    z = pipe.encode_images(pipe._to_unit(tiles))
    np.testing.assert_array_equal(zero, pipe._decode(z, "rgb"))  # strength 0: the codec only
    err = {s: np.abs(pipe.translate(tiles, ["H&E"], steps=4, strength=s, seed=1)["H&E"].astype(float)
                     - tiles).mean() for s in (0.2, 0.9)}
    err[0.0] = np.abs(zero.astype(float) - tiles).mean()
    assert err[0.0] < err[0.2] < err[0.9], err
    with pytest.raises(ConditionError, match="strength must be between 0 and 1"):
        pipe.translate(tiles, ["H&E"], strength=1.5)
    with pytest.raises(ConditionError, match="HER2 are marker maps"):
        pipe.translate(tiles, ["HER2"], strength=0.5)


@pytest.mark.slow
def test_image_to_image_on_a_region_is_seam_free(cmu):
    """SDEdit tiles start from one noise field and the source itself, so blended regions keep
    the tiles' texture in the overlap bands (same bar as the other RGB output)."""
    pipe = model_pipeline()
    translator = RegionTranslator(pipe, batch_size=8, tissue_only=False)
    result = translator(cmu, ["H&E-FFPE"], box=BOX, steps=4, strength=0.5)
    image = np.asarray(result.layers[0].data)
    grid = (int(pipe.tile_size), translator.overlap, translator.step)
    band = overlap_band_texture(image, *grid)
    assert 0.8 < band < 1.25, band
    # tile borders against the model's other 8 px token lines: 1.13 measured (the marker bar of
    # test_slides_seams is 1.1; RGB outputs are held to the band test there too)
    token_lines = np.mean([border_energy_ratio(image, grid[0], grid[1], k, grid[2]) for k in (8, 16, 24)])
    assert border_energy_ratio(image, *grid[:2], step=grid[2]) / token_lines < 1.25


def test_refused_before_any_tile_is_read():
    pipe = model_pipeline()
    slide = ArraySlide(np.full((256, 256, 3), 235, np.uint8), 1.0)  # glass
    with pytest.raises(ConditionError, match="HER2 are marker maps"):
        RegionTranslator(pipe)(slide, ["HER2"], strength=0.5)
    with pytest.raises(ConditionError, match="region .* has 0 stained pixels"):
        RegionTranslator(pipe)(slide, ["HER2"], stain_norm="reinhard")
