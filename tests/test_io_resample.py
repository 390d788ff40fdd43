"""The one resampler (`mupd.io.resample`): training crops and inference tiles are the same pixels."""

from __future__ import annotations

import numpy as np
import pytest

from mupd.data.crops import centred_tiles
from mupd.io import open_slide
from mupd.io.resample import array_reader, resample_window, resize_array
from mupd.io.samples import sample_slide_path
from mupd.regions.source import read_tile


@pytest.fixture(scope="module")
def cmu():
    return open_slide(sample_slide_path())


@pytest.mark.parametrize("mpp", [1.0, 0.499, 0.7])
def test_training_crop_equals_the_inference_tile_at_the_same_place(cmu, mpp):
    """A spot crop of the decoded image (how stores are cut) and the tile `translate` reads from
    the slide at the same place are identical, pixel for pixel, at any target mpp."""
    level0 = np.asarray(cmu.levels[0])
    factor = mpp / cmu.mpp[0]
    for cx, cy in [(1000.0, 1400.0), (812.3, 1733.9)]:
        crop = centred_tiles(level0, np.array([[cx, cy]]), 128, factor)[0]
        tile = read_tile(cmu, cx - 64 * factor, cy - 64 * factor, 128, factor)
        np.testing.assert_array_equal(crop, tile)
        assert crop.std() > 5  # real tissue, not a blank


def test_read_region_and_thumbnail_use_the_same_kernel(cmu):
    """`Slide.read_region(mpp=...)` of a box whose size is a whole number of output pixels is
    the resampler's grid over that box."""
    box, out = (400, 600, 500, 300), (250, 150)
    region = cmu.read_region(box[:2], box[2:], mpp=2 * cmu.mpp[0])
    assert region.shape == (150, 250, 3)
    grid = resample_window(array_reader(np.asarray(cmu.levels[0])), 400, 600, *out, 2.0, 2.0)
    np.testing.assert_array_equal(region, grid)
    thumb = cmu.thumbnail(256)
    assert max(thumb.shape[:2]) == 256 and thumb.dtype == np.uint8


def test_edges_fill_and_exact_copy():
    flat = np.full((40, 60, 3), 200, np.uint8)
    assert (resize_array(flat, 13, 17) == 200).all()  # no darkened borders: edges repeat
    past = resample_window(array_reader(flat, fill=0), -10.0, 0.0, 20, 10, 1.0, 1.0)
    assert (past[:, :10] == 0).all() and (past[:, 10:] == 200).all()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 30), dtype=np.uint8)
    np.testing.assert_array_equal(resample_window(array_reader(image), 5, 7, 10, 10, 1.0, 1.0),
                                  image[7:17, 5:15])
    halved = resize_array(rng.random((64, 64, 2)).astype(np.float32), 32, 32)
    assert halved.shape == (32, 32, 2) and halved.dtype == np.float32
