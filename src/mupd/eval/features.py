"""Handcrafted pathology features of an H&E tile: the documented feature space the evaluation
uses for Frechet distances, the ridge baseline and the held-out scorers.

Every feature is named in FEATURE_NAMES (in order). Groups:
- colour: mean and std of R, G, B in [0, 1]; tissue fraction (grey < 0.8).
- stain (skimage.color.rgb2hed colour deconvolution, Ruifrok-Johnston): mean, std, 10th and
  90th percentile of the hematoxylin (H), eosin (E) and DAB (D) optical densities.
- nuclei (from the hematoxylin channel: Otsu threshold, floored so a nucleus-free tile finds
  none; 1-px opening; objects of 8-150 um^2 kept): density per mm^2 of tissue, mean and std
  area in um^2, nuclear area fraction, mean eccentricity, mean solidity.
- texture on the grey image quantised to 32 levels: GLCM contrast, dissimilarity, homogeneity,
  energy and correlation at 1 and 3 px (averaged over 4 angles); uniform LBP (P=8, R=1)
  histogram, 10 bins.
Sizes are in micrometres through the tile's mpp, so tiles must be compared at one mpp.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.color import rgb2gray, rgb2hed
from scipy.ndimage import binary_opening
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops
from skimage.morphology import disk

from ..errors import ConditionError

_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
_GLCM_DISTANCES = (1, 3)
_LBP_BINS = 10
_NUCLEUS_AREA_UM2 = (8.0, 150.0)
_MIN_H_THRESHOLD = 0.04  # hematoxylin OD below this is not a nucleus, whatever Otsu says

FEATURE_NAMES: tuple[str, ...] = (
    *(f"rgb_mean_{c}" for c in "RGB"),
    *(f"rgb_std_{c}" for c in "RGB"),
    "tissue_fraction",
    *(f"{s}_{stat}" for s in ("hematoxylin", "eosin", "dab") for stat in ("mean", "std", "p10", "p90")),
    "nuclei_per_mm2_tissue", "nucleus_area_mean_um2", "nucleus_area_std_um2",
    "nuclear_area_fraction", "nucleus_eccentricity_mean", "nucleus_solidity_mean",
    *(f"glcm_{p}_d{d}" for d in _GLCM_DISTANCES for p in _GLCM_PROPS),
    *(f"lbp_u8_bin{i}" for i in range(_LBP_BINS)),
)


def tile_features(tile: np.ndarray, mpp: float) -> np.ndarray:
    """FEATURE_NAMES values for one (H, W, 3) uint8 tile at `mpp` micrometres per pixel."""
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ConditionError(f"features need an (H, W, 3) uint8 RGB tile, got {tile.shape} {tile.dtype}")
    rgb = tile.astype(np.float64) / 255.0
    grey = rgb2gray(rgb)
    tissue = grey < 0.8
    hed = rgb2hed(tile)
    colour = [*rgb.mean(axis=(0, 1)), *rgb.std(axis=(0, 1)), tissue.mean()]
    stain = []
    for c in range(3):
        ch = hed[..., c]
        stain += [ch.mean(), ch.std(), *np.percentile(ch, (10, 90))]
    return np.asarray(colour + stain + _nuclei(hed[..., 0], tissue, mpp) + _texture(grey),
                      dtype=np.float64)


def features(tiles: np.ndarray | Sequence[np.ndarray], mpp: float) -> np.ndarray:
    """(N, len(FEATURE_NAMES)) features of N tiles at one mpp."""
    if len(tiles) == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    return np.stack([tile_features(np.asarray(t), mpp) for t in tiles])


def _nuclei(h: np.ndarray, tissue: np.ndarray, mpp: float) -> list[float]:
    threshold = max(threshold_otsu(h) if np.ptp(h) > 0 else np.inf, _MIN_H_THRESHOLD)
    mask = binary_opening(h > threshold, structure=disk(1))
    px_area = mpp * mpp
    lo, hi = (a / px_area for a in _NUCLEUS_AREA_UM2)
    props = [p for p in regionprops(label(mask)) if lo <= p.area <= hi]
    tissue_mm2 = max(tissue.sum(), 1) * px_area / 1e6
    if not props:
        return [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    areas = np.array([p.area for p in props]) * px_area
    return [len(props) / tissue_mm2, areas.mean(), areas.std(), areas.sum() / (h.size * px_area),
            float(np.mean([p.eccentricity for p in props])),
            float(np.mean([p.solidity for p in props]))]


def _texture(grey: np.ndarray) -> list[float]:
    q = np.clip(grey * 32, 0, 31).astype(np.uint8)
    glcm = graycomatrix(q, distances=_GLCM_DISTANCES, angles=(0, np.pi / 4, np.pi / 2, 3 * np.pi / 4),
                        levels=32, symmetric=True, normed=True)
    texture = []
    for d in range(len(_GLCM_DISTANCES)):
        for prop in _GLCM_PROPS:
            value = graycoprops(glcm, prop)[d].mean()
            texture.append(0.0 if not np.isfinite(value) else float(value))
    lbp = local_binary_pattern((grey * 255).astype(np.uint8), P=8, R=1, method="uniform")
    hist, _ = np.histogram(lbp, bins=_LBP_BINS, range=(0, _LBP_BINS))
    return texture + list(hist / lbp.size)
