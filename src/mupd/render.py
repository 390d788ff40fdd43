"""Brightfield rendering of predicted marker intensity as a familiar DAB IHC image.

A pathologist reads IHC as brown DAB on a blue hematoxylin counterstain. We separate the
source H&E into stain optical densities (Ruifrok-Johnston colour deconvolution, scikit-image),
keep its hematoxylin, drop eosin, and lay DAB at an optical density proportional to the
predicted marker intensity, then recompose with Beer-Lambert. The output is a rendering of a
prediction, and every caller says so in the result's metadata.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, rgb2hed

from .errors import ConditionError

#: DAB density (skimage HED units) at marker intensity 1: the 99th percentile of DAB in
#: scikit-image's real IHC image (FHL2, colon), i.e. strong staining.
DAB_MAX = 0.2


def render_dab_ihc(he: np.ndarray, marker: np.ndarray, dab_max: float = DAB_MAX) -> np.ndarray:
    """(N, H, W, 3) uint8 H&E + (N, H, W) marker in [0, 1] -> (N, H, W, 3) uint8 virtual IHC."""
    he = np.asarray(he)
    marker = np.asarray(marker, dtype=np.float32)
    if he.shape[:-1] != marker.shape or he.shape[-1] != 3:
        raise ConditionError(f"cannot render DAB: H&E tiles {he.shape} and marker maps "
                             f"{marker.shape} must be (N, H, W, 3) and (N, H, W)")
    out = np.empty_like(he, dtype=np.uint8)
    for i in range(len(he)):
        hed = rgb2hed(he[i])
        hed[..., 1] = 0.0
        hed[..., 2] = np.clip(marker[i], 0.0, 1.0) * dab_max
        out[i] = np.clip(hed2rgb(hed) * 255.0, 0, 255).round().astype(np.uint8)
    return out
