"""No seams: gradient energy across tile borders equals the energy elsewhere, on the real CMU slide.

The statistic: mean squared first difference of the output between the two pixels either side of
every tile border (both tile edges, rows and columns), divided by the same mean over all other
neighbouring pixel pairs. 1 means borders are indistinguishable from tissue texture.

Threshold 1.25: moving the border set a few pixels (3..29) so that it falls on ordinary columns
gives ratios between 0.74 and 1.21 on this region (the natural spread of tissue texture), so a
border set above 1.25 is more energetic than any ordinary set; hard tiling of the same
tile-dependent output gives 3.7.
"""

from __future__ import annotations

import numpy as np
import pytest

from mupd.io import open_slide
from mupd.slides import RegionTranslator, TileGrid
from test_slides_support import TileContextPipeline, cmu_slide_path, model_pipeline

SEAM_LIMIT = 1.25
BOX = (200, 400, 1600, 1600)  # level-0, 1600 x 1600 px of tissue -> 798 x 798 at 1 um/px


def border_energy_ratio(image: np.ndarray, tile: int, overlap: int, shift: int = 0) -> float:
    """Gradient energy across tile borders (moved by `shift` px) over the energy elsewhere."""
    image = image.astype(np.float64)
    if image.ndim == 3:
        image = image.mean(axis=2)
    origins = TileGrid(image.shape[0], image.shape[1], tile, overlap).origins()
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


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "known defect: the bundled 600-step CPU model predicts near-constant per-tile marker levels "
    "that differ between neighbours, so 32 px feathering leaves visible seams (ratio 2.4 on the "
    "CMU region vs the 1.25 threshold); needs a better-trained model or wider overlap"))
def test_model_output_has_no_seam(cmu):
    pipe = model_pipeline()
    tile = int(pipe.tile_size)
    translator = RegionTranslator(pipe, batch_size=8, tissue_only=False)
    result = translator(cmu, ["Ki67"], box=BOX, steps=1, render_brightfield=False)
    marker = np.asarray(result.layers[0].data)
    assert marker.std() > 0
    assert border_energy_ratio(marker, tile, translator.overlap) < SEAM_LIMIT
