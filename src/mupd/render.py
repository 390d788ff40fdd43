"""Brightfield rendering of predicted marker intensity as a familiar DAB IHC image.

A pathologist reads IHC as brown DAB on a blue hematoxylin counterstain. We separate the
source H&E into stain optical densities (Ruifrok-Johnston colour deconvolution, scikit-image),
keep its hematoxylin (lightened to an IHC counterstain in `render_ihc`), drop eosin, lay DAB,
then recompose with Beer-Lambert. The output is a
rendering of a prediction, and every caller says so in the result's metadata.

`render_ihc` lays DAB the way a real IHC does: in cells. The source's nuclei and cells are
segmented (`mupd.cells`), each cell takes the predicted marker level averaged over it, and DAB
goes into the marker's compartment (nuclear: the nucleus; membranous: a thin ring at the cell
boundary; cytoplasmic: the cell minus its nucleus) at an optical density proportional to that
level, uniform within the cell; cells below the marker's positivity threshold get almost none,
so negative nuclei stay blue. Large images are rendered in windows with a margin (bounded
memory, and the same cells as one pass). `render_dab_ihc` is the earlier per-pixel wash (DAB at
the predicted level on every pixel), kept for markers of unknown ("diffuse") localisation.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from .cells import segment_cells_hed
from .errors import ConditionError

#: DAB density (skimage HED units) at marker intensity 1: the 99th percentile of DAB in
#: scikit-image's real IHC image (FHL2, colon), i.e. strong staining.
DAB_MAX = 0.2
#: What a cell below the positivity threshold keeps of its DAB (a faint blush, not a stain).
NEGATIVE_FRACTION = 0.1
#: DAB in the compartments a marker does not target, relative to its own compartment
#: (membranous stains blush the cytoplasm a little; cytoplasmic ones spare the nucleus).
SPILL = {"nuclear": {"nucleus": 1.0, "cytoplasm": 0.0, "membrane": 0.0},
         "membranous": {"nucleus": 0.0, "cytoplasm": 0.15, "membrane": 1.0},
         "cytoplasmic": {"nucleus": 0.05, "cytoplasm": 1.0, "membrane": 1.0}}
#: Hematoxylin kept of the source H&E's: an IHC counterstain is a light hematoxylin (nuclei at a
#: median OD of 0.043 in scikit-image's real IHC, 0.11-0.13 in CMU-1's H&E, both found by
#: `mupd.cells`), so at full strength negative nuclei are navy and positive ones near black.
COUNTERSTAIN = 0.35
#: Width of the membranous ring (um).
MEMBRANE_UM = 1.0
#: Softness of stained edges (Gaussian sigma, um): a microscope's point spread, and no
#: staircase edges at the model's 1 um/px.
EDGE_UM = 0.4
#: Images with a side above this (px) are rendered in windows of this size ...
WINDOW_PX = 2048
#: ... each read with this margin (um) around it, so that cells on a window edge are whole.
MARGIN_UM = 40.0


def render_dab_ihc(he: np.ndarray, marker: np.ndarray, dab_max: float = DAB_MAX) -> np.ndarray:
    """(N, H, W, 3) uint8 H&E + (N, H, W) marker in [0, 1] -> (N, H, W, 3) uint8 virtual IHC,
    DAB at the predicted level on every pixel (no cells)."""
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
        out[i] = _compose(hed)
    return out


def render_ihc(he: Any, marker: Any, mpp: float, compartment: str = "nuclear",
               threshold: float = 0.3, dab_max: float = DAB_MAX,
               counterstain: float = COUNTERSTAIN, out: Optional[Any] = None,
               window: int = WINDOW_PX) -> Any:
    """(H, W, 3) uint8 H&E + (H, W) marker in [0, 1] at `mpp` um/px -> (H, W, 3) uint8 IHC.

    `he` and `marker` may be any arrays that slice to numpy (numpy, zarr, a lazy view); the
    result is written into `out` (anything that takes numpy slice assignment) when given, so a
    region larger than memory is rendered window by window. `compartment` "diffuse" is the
    per-pixel wash of `render_dab_ihc`. `counterstain` scales the source's hematoxylin (1: as
    in the H&E).
    """
    shape = tuple(he.shape)
    if len(shape) != 3 or shape[2] != 3 or tuple(marker.shape) != shape[:2]:
        raise ConditionError(f"cannot render DAB: H&E {shape} and marker map {tuple(marker.shape)} "
                             f"must be (H, W, 3) and (H, W)")
    if compartment != "diffuse" and compartment not in SPILL:
        raise ConditionError(f"cannot render DAB in compartment {compartment!r}; known: "
                             f"{', '.join((*SPILL, 'diffuse'))}")
    H, W = shape[:2]
    if out is None:
        out = np.empty((H, W, 3), dtype=np.uint8)
    margin = int(math.ceil(MARGIN_UM / mpp)) if H > window or W > window else 0
    for y0 in range(0, H, window):
        for x0 in range(0, W, window):
            y1, x1 = min(y0 + window, H), min(x0 + window, W)
            ya, xa = max(y0 - margin, 0), max(x0 - margin, 0)
            yb, xb = min(y1 + margin, H), min(x1 + margin, W)
            he_w = np.asarray(he[ya:yb, xa:xb])
            marker_w = np.asarray(marker[ya:yb, xa:xb], dtype=np.float32)
            rgb = _render_window(he_w, marker_w, mpp, compartment, threshold, dab_max, counterstain)
            out[y0:y1, x0:x1] = rgb[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    return out


def _render_window(he: np.ndarray, marker: np.ndarray, mpp: float, compartment: str,
                   threshold: float, dab_max: float, counterstain: float) -> np.ndarray:
    hed = rgb2hed(he[..., :3]).astype(np.float32)
    marker = np.clip(np.nan_to_num(marker), 0.0, 1.0)
    if compartment == "diffuse":
        dab = marker * dab_max
    else:
        dab = cell_dab(hed, marker, mpp, compartment, threshold, dab_max)
    hed[..., 0] *= counterstain
    hed[..., 1] = 0.0
    hed[..., 2] = dab
    return _compose(hed)


def cell_dab(hed: np.ndarray, marker: np.ndarray, mpp: float, compartment: str,
             threshold: float, dab_max: float = DAB_MAX) -> np.ndarray:
    """(H, W) DAB optical density laid by cell: each cell's mean predicted level, in its
    compartment (`SPILL`), faint below `threshold`; no DAB outside cells."""
    seg = segment_cells_hed(hed, mpp)
    level = seg.mean(marker)
    od = (dab_max * level * np.where(level >= threshold, 1.0, NEGATIVE_FRACTION)).astype(np.float32)
    od[0] = 0.0
    spill = SPILL[compartment]
    weight = np.where(seg.nuclei > 0, spill["nucleus"], spill["cytoplasm"]).astype(np.float32)
    if spill["membrane"] != spill["cytoplasm"]:
        ring = seg.membrane(MEMBRANE_UM) > 0
        weight[ring] = spill["membrane"]
    dab = od[seg.cells] * weight
    if EDGE_UM > 0:  # the optics' blur: stained edges a fraction of a micrometre soft
        dab = ndi.gaussian_filter(dab, sigma=EDGE_UM / mpp, truncate=3.0)
    return dab


def _compose(hed: np.ndarray) -> np.ndarray:
    return np.clip(hed2rgb(hed) * 255.0, 0, 255).round().astype(np.uint8)
