"""No seams: gradient energy across tile borders equals the energy elsewhere, on the real CMU slide.

The statistic: mean squared first difference of the output between the two pixels either side of
every tile border (both tile edges, rows and columns), divided by the same mean over all other
neighbouring pixel pairs. 1 means borders are indistinguishable from tissue texture.

Threshold 1.25: moving the border set a few pixels (3..29) so that it falls on ordinary columns
gives ratios between 0.74 and 1.21 on this region (the natural spread of tissue texture), so a
border set above 1.25 is more energetic than any ordinary set; hard tiling of the same
tile-dependent output gives 3.7.

With the bundled model the statistic is confounded: its output has an 8 px token grid (latents 4x
down x patch 2) on which every tile border lies, and every other 8 px line set scores as high as
the borders (1.5-1.6; 2.2 with the earlier pixel-codec model). The tile seam proper is measured
against those lines, and by the texture of the overlap bands: with independent noise per tile
the model's output is mostly that noise (two seeds of one tile correlate at r = 0.01), so
overlapping predictions disagree and blending them leaves smoother bands (0.55 of the tile
centres' gradient energy) on a 96 px grid. Tiles therefore cut
their starting noise from one field over the region (`translate(positions=...)`).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mupd.errors import ConditionError
from mupd.io import open_slide
from mupd.regions.plan import TileGrid
from mupd.regions.source import read_tile
from mupd.regions.translate import RegionTranslator
from support_slides import TileContextPipeline, cmu_slide_path, model_pipeline

SEAM_LIMIT = 1.25
BOX = (200, 400, 1600, 1600)  # level-0, 1600 x 1600 px of tissue -> 798 x 798 at 1 um/px


def _grey(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return image.mean(axis=2) if image.ndim == 3 else image


def border_energy_ratio(image: np.ndarray, tile: int, overlap: int, shift: int = 0,
                        step: int = 1) -> float:
    """Gradient energy across tile borders (moved by `shift` px) over the energy elsewhere."""
    image = _grey(image)
    origins = TileGrid(image.shape[0], image.shape[1], tile, overlap, step).origins()
    energy, at_border = [], []
    for axis in (0, 1):
        starts = sorted({o[axis] for o in origins})
        borders = {b + shift for s in starts for b in (s, s + tile)}
        g = (np.diff(image, axis=axis) ** 2).mean(axis=1 - axis)  # g[j]: between j and j + 1
        mask = np.zeros(len(g), dtype=bool)
        mask[[b - 1 for b in borders if 0 < b < image.shape[axis]]] = True
        energy.append(g)
        at_border.append(mask)
    g, m = np.concatenate(energy), np.concatenate(at_border)
    return float(g[m].mean() / g[~m].mean())


def overlap_band_texture(image: np.ndarray, tile: int, overlap: int, step: int = 1) -> float:
    """Gradient energy at the centres of the overlap bands over that at the tile centres (both
    axes, smoothed over 9 px). Blending predictions that disagree averages them into smoother
    bands (< 1); predictions that agree blend into the same texture (1)."""
    image = _grey(image)
    origins = TileGrid(image.shape[0], image.shape[1], tile, overlap, step).origins()
    bands, centres = [], []
    for axis in (0, 1):
        starts = sorted({o[axis] for o in origins})
        g = ndimage.uniform_filter1d((np.diff(image, axis=axis) ** 2).mean(axis=1 - axis), 9)
        bands += [g[(b + a + tile) // 2] for a, b in zip(starts, starts[1:])]
        centres += [g[s + tile // 2] for s in starts if s + tile // 2 < len(g)]
    return float(np.mean(bands) / np.mean(centres))


@pytest.fixture(scope="module")
def cmu(shared_data):
    return open_slide(cmu_slide_path(shared_data))


def _marker(slide, pipe, overlap: float) -> np.ndarray:
    result = RegionTranslator(pipe, batch_size=8, overlap=overlap, tissue_only=False)(
        slide, ["Ki67"], box=BOX, render_brightfield=False)
    return np.asarray(result.layers[0].data)


def test_feathered_tiles_leave_no_seam_where_hard_tiles_do(cmu):
    pipe = TileContextPipeline(tile_size=128, mpp=1.0)
    blended = _marker(cmu, pipe, overlap=0.25)
    hard = _marker(cmu, pipe, overlap=0.0)
    ratio = border_energy_ratio(blended, 128, 32)
    assert ratio < SEAM_LIMIT, f"seam ratio {ratio:.3f}"
    assert border_energy_ratio(hard, 128, 0) > 2.0  # the statistic does see seams
    nulls = [border_energy_ratio(blended, 128, 32, shift=k) for k in range(3, 30)]
    assert max(nulls) < SEAM_LIMIT  # the threshold sits above the texture's own spread


def test_overlapping_tiles_share_noise_so_model_predictions_agree(cmu):
    """The cause of the model's seams, measured directly: two tiles 64 px apart predict the same
    64 px strip. Independent noise per tile: r near 0. One noise field over the region: r > 0.8
    (measured 0.993 with the 600-step model, 0.893 with the 3600-step one, whose maps also follow
    the tile's context; the seam test below checks what that leaves visible)."""
    pipe = model_pipeline()
    tile, f = int(pipe.tile_size), pipe.mpp / cmu.mpp[0]
    shift = tile // 2
    tiles = np.stack([read_tile(cmu, BOX[0] + x * f, BOX[1], tile, f) for x in (0, shift)])
    noise = pipe._noise(2, 0, [(0, 0), (0, shift)]).numpy()
    lat = shift // pipe.latent_step
    np.testing.assert_array_equal(noise[0][..., lat:], noise[1][..., :-lat])

    def overlap_r(positions):
        a, b = pipe.translate(tiles, ["Ki67"], positions=positions)["Ki67"]
        return np.corrcoef(a[:, shift:].ravel(), b[:, :-shift].ravel())[0, 1]

    independent, shared = overlap_r(None), overlap_r([(0, 0), (0, shift)])
    assert abs(independent) < 0.2 < 0.8 < shared, (independent, shared)


def test_tile_positions_off_the_latent_grid_are_refused():
    pipe = model_pipeline()
    tiles = np.full((1, pipe.tile_size, pipe.tile_size, 3), 200, np.uint8)
    with pytest.raises(ConditionError, match=r"\(0, 2\) px is not .*latent step 4"):
        pipe.translate(tiles, ["Ki67"], positions=[(0, 2)])
    with pytest.raises(ConditionError, match="2 tile positions given for 1 tiles"):
        pipe.translate(tiles, ["Ki67"], positions=[(0, 0), (0, 4)])


@pytest.mark.slow
def test_model_output_has_no_tile_seam(cmu):
    """Bundled model over the CMU region, a marker and an RGB output: the overlap bands keep the
    tiles' texture (no smoothing by averaging disagreeing predictions: the RGB output is not
    smeared), and tile borders are no more energetic than the model's other 8 px token lines."""
    pipe = model_pipeline()
    tile = int(pipe.tile_size)
    translator = RegionTranslator(pipe, batch_size=8, tissue_only=False)
    result = translator(cmu, ["Ki67", "H&E"], box=BOX, steps=1)
    grid = (tile, translator.overlap, translator.step)
    for layer in result.layers:
        image = np.asarray(layer.data)
        assert image.std() > 0
        band = overlap_band_texture(image, *grid)
        assert 0.8 < band < 1.25, f"{layer.name}: overlap-band texture {band:.2f} of the tile centres'"
        if layer.name == "Ki67":
            token_lines = np.mean([border_energy_ratio(image, tile, translator.overlap, k, translator.step)
                                   for k in (8, 16, 24, 32, 40)])
            ratio = border_energy_ratio(image, *grid[:2], step=translator.step) / token_lines
            assert ratio < 1.1, f"tile borders {ratio:.2f} x the other token lines"


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known model defect, not a blending one: the bundled model's output has an 8 px token grid "
    "(latents 4x down, patch 2) and every tile border lies on it; on the CMU region 8 px line sets "
    "score 1.48-1.58 (lines off the grid 0.87-0.90) vs the 1.25 threshold, tile borders 1.59 "
    "(pixel-codec model: 2.2 and 2.3-2.4); their excess over the token lines is measured above"))
def test_model_output_borders_like_ordinary_pixels(cmu):
    pipe = model_pipeline()
    tile = int(pipe.tile_size)
    translator = RegionTranslator(pipe, batch_size=8, tissue_only=False)
    result = translator(cmu, ["Ki67"], box=BOX, steps=1, render_brightfield=False)
    marker = np.asarray(result.layers[0].data)
    assert marker.std() > 0
    assert border_energy_ratio(marker, tile, translator.overlap, step=translator.step) < SEAM_LIMIT
