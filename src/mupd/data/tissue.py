"""Tissue detection that rejects glass, background and pen marks.

Stained tissue absorbs light (optical density) and is coloured (saturation). Pen ink is also
dark and coloured, so two more cues separate it: green/blue hues that H&E never has, and
texture. Ink is smooth at tile scale, while tissue always carries nuclei and fibres, so the
mean Laplacian-of-Gaussian response inside the stained area is an order of magnitude higher
(measured on ../shared/data/he_patches/misc_he: pen-only tiles < 0.001, tissue > 0.007).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology
from skimage.color import rgb2gray, rgb2hsv

from ..errors import SlideError

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


@dataclass
class TissueMask:
    """Slide-level tissue mask on a thumbnail; `downsample` is level-0 px per mask px (x, y)."""

    mask: np.ndarray
    downsample: tuple[float, float]

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Share of tissue inside the level-0 box (x, y, w, h)."""
        sx, sy = self.downsample
        x0, y0 = int(np.floor(x / sx)), int(np.floor(y / sy))
        x1, y1 = max(int(np.ceil((x + w) / sx)), x0 + 1), max(int(np.ceil((y + h) / sy)), y0 + 1)
        window = self.mask[max(y0, 0):y1, max(x0, 0):x1]
        return float(window.mean()) if window.size else 0.0


def slide_tissue_mask(slide, max_size: int = 2048, min_object_um2: float = 2e4) -> TissueMask:
    """Tissue mask of a `mupd.io` Slide from its thumbnail: stained, non-pen pixels, closed,
    with specks (< `min_object_um2`, or < 64 thumbnail px when the mpp is unknown) and small
    holes removed. Texture is not checked at this scale: `is_tissue` re-checks each tile."""
    thumb = np.asarray(slide.thumbnail(max_size))[..., :3]
    if thumb.dtype != np.uint8:
        raise SlideError(f"tissue detection needs an 8-bit RGB slide; {slide.path} is {thumb.dtype}")
    width, height = slide.dimensions
    downsample = (width / thumb.shape[1], height / thumb.shape[0])
    mask = morphology.closing(tissue_mask(thumb), morphology.disk(2))
    if slide.mpp is not None:
        pixel_um2 = downsample[0] * slide.mpp[0] * downsample[1] * slide.mpp[1]
        min_pixels = max(int(min_object_um2 / pixel_um2), 4)
    else:
        min_pixels = 64
    mask = morphology.remove_small_objects(mask, max_size=min_pixels)
    mask = morphology.remove_small_holes(mask, max_size=min_pixels)
    return TissueMask(mask=mask, downsample=downsample)
