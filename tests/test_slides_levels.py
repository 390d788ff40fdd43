"""A readout that varies between tiles, not in them, blends into a smooth map, not blocks.

A model trained on one spot per tile reads out about one marker level per tile. Feathered
alone, neighbouring levels meet across the 32 px overlap band and the tile grid shows as blocks
(the warm-started pooled candidate of 2026-12-03, `benchmarks/results/mupd-tiny-pooled-warm/`).
The tile level is therefore interpolated between tile centres (`regions.blend.level_window`).
"""

from __future__ import annotations

import numpy as np
from skimage.data import immunohistochemistry

from mupd.regions.blend import feather_window, level_window
from mupd.regions.source import ArraySlide
from mupd.regions.translate import RegionTranslator
from support_slides import TileLevelPipeline


def _translate(overlap: float = 0.25):
    pipe = TileLevelPipeline(tile_size=128, mpp=1.0)
    slide = ArraySlide(immunohistochemistry(), mpp=1.0)
    translator = RegionTranslator(pipe, batch_size=8, overlap=overlap, tissue_only=False)
    result = translator(slide, ["Ki67"], render_brightfield=False)
    tiles = {o: pipe.translate(slide.image[o[0]:o[0] + 128, o[1]:o[1] + 128][None], ["Ki67"])
             ["Ki67"][0, 0, 0] for o in result.region.origins}
    return np.asarray(result.layers[0].data), tiles


def test_tile_levels_are_interpolated_between_tile_centres():
    marker, levels = _translate()
    assert np.ptp(list(levels.values())) > 0.1  # the tiles do disagree
    for (oy, ox), level in levels.items():  # a tile's own centre keeps its level (tents are
        # sampled at pixel centres, so a neighbour's weighs 0.5 / 96 there)
        assert abs(marker[oy + 64, ox + 64] - level) < 2e-3
    # bilinear between centres 96 px apart: no step steeper than the largest neighbour difference
    # spread over the stride (feathering over the 32 px band would be about 5x steeper)
    origins = sorted(levels)
    jumps = [abs(levels[a] - levels[b]) for a in origins for b in origins
             if 0 < abs(a[0] - b[0]) + abs(a[1] - b[1]) <= 96]
    steepest = max(np.abs(np.diff(marker, axis=ax)).max() for ax in (0, 1))
    assert steepest <= max(jumps) / 96 * 1.05 + 1e-4, (steepest, max(jumps) / 96)


def test_hard_tiles_keep_one_flat_level_each():
    marker, levels = _translate(overlap=0.0)
    for (oy, ox), level in levels.items():
        assert np.allclose(marker[oy:oy + 128, ox:ox + 128], level, atol=1e-4)


def test_level_tents_a_stride_apart_sum_to_one():
    margin, tent = level_window(128, 96)
    assert margin == 32 and tent.shape == (192, 192)
    ramp = tent[96] / np.sqrt(tent[96, 96])  # the 1-D profile (the tent is its outer product)
    line = np.zeros(96 * 4 + 192)
    for k in range(4):
        line[96 * k: 96 * k + 192] += ramp
    assert np.allclose(line[96:96 * 4], 1.0, atol=1e-5)
    assert feather_window(128, 32).shape == (128, 128)
