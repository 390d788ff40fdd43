"""WSI tiling at a target mpp with a thumbnail tissue mask, checked tile by tile."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mupd.data.tiling import read_tiles, tile_grid
from mupd.data.tissue import is_tissue, slide_tissue_mask
from mupd.errors import DataError
from mupd.io import open_slide


def test_mask_keeps_exactly_the_tissue_tiles_of_a_real_slide(shared_data):
    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as slide:  # 0.499 um/px
        everything = tile_grid(slide, 2.0, 128, mask=None)
        grid = tile_grid(slide, 2.0, 128)
        assert (everything.w == 513).all() and (everything.h == 513).all()  # 256 um at 0.499
        kept, tiles = read_tiles(slide, grid)
        _, all_tiles = read_tiles(slide, everything, check_tissue=False)
        mask = slide_tissue_mask(slide)
    truth = {(x, y) for (x, y), t in zip(everything[["x", "y"]].to_numpy().tolist(), all_tiles)
             if is_tissue(t)}
    # The section covers part of the region: some tiles are glass, and the cheap thumbnail
    # mask selects the same tiles the full-detail test accepts.
    assert 0 < len(truth) < len(everything)
    assert {tuple(p) for p in kept[["x", "y"]].to_numpy().tolist()} == truth
    assert tiles.shape == (len(kept), 128, 128, 3) and tiles.dtype == np.uint8
    assert (kept.tissue_fraction >= 0.1).all() and 0.1 < mask.mask.mean() < 0.9


def test_overlap_and_bad_requests(shared_data):
    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as slide:
        plain = tile_grid(slide, 1.0, 256, mask=None)
        overlapping = tile_grid(slide, 1.0, 256, overlap=64, mask=None)
        step = np.diff(np.unique(overlapping.x))
        assert len(overlapping) > len(plain) and np.allclose(step, 192 / 0.499, atol=1)
        with pytest.raises(DataError, match="overlap"):
            tile_grid(slide, 1.0, 256, overlap=256)
        with pytest.raises(DataError, match="larger than"):
            tile_grid(slide, 8.0, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file's missing mpp is warned about on open
        with open_slide(shared_data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs") as slide:
            with pytest.raises(DataError, match="has no mpp"):
                tile_grid(slide, 1.0, 128)
