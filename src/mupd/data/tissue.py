"""Tissue detection that rejects glass, background and pen marks.

Stained tissue absorbs light (optical density) and is coloured (saturation). Pen ink is also
dark and coloured, so two more cues separate it: green/blue hues that H&E never has, and
texture. Ink is smooth at tile scale, while tissue always carries nuclei and fibres, so the
mean Laplacian-of-Gaussian response inside the stained area is an order of magnitude higher
(measured on ../shared/data/he_patches/misc_he: pen-only tiles < 0.001, tissue > 0.007).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2hsv

#: Summed RGB optical density above which a pixel is stained (not glass).
MIN_OD = 0.35
MIN_SATURATION = 0.08
#: Fraction of a tile that must be tissue for the tile to count as tissue.
MIN_TISSUE_FRACTION = 0.1
#: Mean |LoG| (sigma 1 px, grey in [0, 1]) inside the stained area; below it the stain is ink.
MIN_TEXTURE = 0.003


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of stained, non-pen pixels of an (H, W, 3) uint8 image."""
    rgb = np.asarray(rgb)[..., :3]
    unit = rgb.astype(np.float32) / 255.0
    hsv = rgb2hsv(unit)
    hue, sat = hsv[..., 0], hsv[..., 1]
    od = -np.log(np.clip(unit, 1e-3, 1.0)).sum(axis=-1)
    stained = (od > MIN_OD) & (sat > MIN_SATURATION)
    green_pen = (hue > 0.2) & (hue < 0.55) & (sat > 0.15)
    blue_pen = (hue > 0.55) & (hue < 0.72) & (sat > 0.25)
    return stained & ~green_pen & ~blue_pen


def texture(rgb: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return 0.0
    grey = rgb2gray(np.asarray(rgb)[..., :3])
    response = np.abs(ndi.gaussian_laplace(grey.astype(np.float32), sigma=1.0))
    return float(response[mask].mean())


def tissue_fraction(rgb: np.ndarray) -> float:
    return float(tissue_mask(rgb).mean())


def is_tissue(rgb: np.ndarray, min_fraction: float = MIN_TISSUE_FRACTION) -> bool:
    """True for a tile worth running the model on (and worth training on)."""
    mask = tissue_mask(rgb)
    return bool(mask.mean() >= min_fraction and texture(rgb, mask) >= MIN_TEXTURE)
