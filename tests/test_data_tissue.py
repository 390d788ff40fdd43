"""Tissue detection on real tiles whose names say what they hold (histolab / tiatoolbox)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import data as skdata

from mupd.data.tissue import is_tissue, tissue_fraction

REJECT = ("no-tissue", "almost-white")


def test_misc_he_tiles_are_classified_by_their_names(shared_data):
    files = sorted((shared_data / "he_patches" / "misc_he").glob("*.png"))
    assert len(files) > 20
    wrong = []
    for f in files:
        name = f.name.removeprefix("histolab_")
        expect = False if name.startswith(REJECT) else True if name.startswith("tissue") else None
        if expect is None:
            continue
        got = is_tissue(np.asarray(Image.open(f).convert("RGB")))
        if got != expect:
            wrong.append((f.name, got))
    assert not wrong, wrong


def test_pen_only_tiles_are_rejected_despite_being_dark_and_coloured(shared_data):
    folder = shared_data / "he_patches" / "misc_he"
    for name in ("histolab_no-tissue-red-pen.png", "histolab_no-tissue-green-pen.png"):
        tile = np.asarray(Image.open(folder / name).convert("RGB"))
        assert tissue_fraction(tile) > 0.0 or name.endswith("green-pen.png")  # ink looks stained
        assert not is_tissue(tile), name  # ... but is smooth or pen-coloured


def test_real_ihc_image_is_tissue_and_blank_glass_is_not():
    ihc = skdata.immunohistochemistry()  # real brightfield IHC shipped with scikit-image
    assert is_tissue(ihc[:256, :256])
    glass = np.full((128, 128, 3), 242, dtype=np.uint8)
    glass += np.random.default_rng(0).integers(0, 4, glass.shape, dtype=np.uint8)
    assert not is_tissue(glass)
