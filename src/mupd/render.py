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
memory, and the same cells as one pass). `render_ihc_cells` renders several markers over one
segmentation and returns the cells with each marker's level, what `mupd.scores` reads out.
`render_dab_ihc` is the earlier per-pixel wash (DAB at
the predicted level on every pixel), kept for markers of unknown ("diffuse") localisation.

Counterstain and DAB strength differ from lab to lab (nuclei of the two real IHC images in
`../shared/data/ihc` differ 2x in hematoxylin, their tissue 3x), so no constant fits every
lab: `measure_ihc_look` reads them off an IHC image of the user's own lab (`IhcLook`), and the
rendering then maps the source's nuclear and background hematoxylin and its strongest DAB onto
that lab's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from .cells import CellSegmentation, segment_cells_hed
from .errors import ConditionError
from .scores import CellReadout

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
#: Optical density sum above which a pixel of an IHC image is tissue, for `measure_ihc_look`.
LOOK_TISSUE_OD = 0.05
#: Percentile of a reference IHC's DAB over its tissue taken as strong staining (as `DAB_MAX`).
LOOK_DAB_PERCENTILE = 99.0
#: Fewest nuclei an image must show for its counterstain to be measured.
LOOK_MIN_NUCLEI = 10
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


@dataclass(frozen=True)
class IhcLook:
    """How one lab's IHC looks, in optical density (skimage HED units): the median hematoxylin
    of its counterstain in nuclei and in the rest of the tissue, and the DAB of strong
    staining. Rendering with it maps the source H&E's nuclear and background hematoxylin onto
    these levels and lays DAB at `dab_max` for a marker level of 1."""

    nucleus_h: float
    background_h: float
    dab_max: float

    def to_dict(self) -> dict[str, float]:
        return {"nucleus_h": self.nucleus_h, "background_h": self.background_h, "dab_max": self.dab_max}

    @classmethod
    def from_dict(cls, values: dict[str, float], what: str = "IHC look") -> "IhcLook":
        """Checked: exactly the three fields, each an optical density in (0, 3]."""
        fields = ("nucleus_h", "background_h", "dab_max")
        if not isinstance(values, dict) or set(values) != set(fields):
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ConditionError(f"{what} must give exactly {', '.join(fields)}; got {got}")
        for name in fields:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3:
                raise ConditionError(f"{what}: {name}={v!r} must be an optical density in (0, 3]")
        return cls(*(float(values[name]) for name in fields))


def measure_ihc_look(rgb: np.ndarray, mpp: float, what: str = "reference IHC") -> IhcLook:
    """The `IhcLook` of a real brightfield IHC image (H, W, 3) at `mpp` um/px: nuclei found as
    in the rendering (`mupd.cells`), medians over tissue (OD sum > `LOOK_TISSUE_OD`)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ConditionError(f"{what}: an RGB image is needed, got shape {rgb.shape}")
    hed = rgb2hed(rgb[..., :3]).astype(np.float32)
    return _look_of(hed, segment_cells_hed(hed, mpp), mpp, what)


def _look_of(hed: np.ndarray, seg: CellSegmentation, mpp: float, what: str) -> IhcLook:
    """`measure_ihc_look` of an image already deconvolved (`hed`) and segmented (`seg`)."""
    tissue = hed.clip(0).sum(axis=2) > LOOK_TISSUE_OD
    nuclei = (seg.nuclei > 0) & tissue
    if seg.n_cells < LOOK_MIN_NUCLEI or not (tissue & ~nuclei).any():
        raise ConditionError(f"{what}: found {seg.n_cells} nuclei in {int(tissue.sum())} tissue "
                             f"pixels at {mpp:g} um/px; its counterstain cannot be measured (needs "
                             f"at least {LOOK_MIN_NUCLEI} nuclei: is it a brightfield IHC, and is "
                             "its um/px right?)")
    hema = hed[..., 0]
    return IhcLook(float(np.median(hema[nuclei])), float(np.median(hema[tissue & ~nuclei])),
                   float(np.percentile(hed[..., 2][tissue].clip(0), LOOK_DAB_PERCENTILE)))


def read_ihc_look(path: str | Path, mpp: Optional[float] = None, max_side: int = 2048) -> IhcLook:
    """`measure_ihc_look` of an image file (any format `mupd.io` opens; `mpp` when the file
    states none), over its central `max_side` px at full resolution."""
    from .io import open_slide

    with open_slide(path, mpp=mpp) as slide:
        if slide.mpp is None:
            raise ConditionError(f"{path}: the reference IHC has no microns-per-pixel value; give one")
        width, height = slide.dimensions
        w, h = min(width, max_side), min(height, max_side)
        rgb = slide.read_region(((width - w) // 2, (height - h) // 2), (w, h))
    return measure_ihc_look(rgb, float(np.mean(slide.mpp)), f"reference IHC {path}")


@dataclass
class MarkerMap:
    """One predicted marker to render: its (H, W) map in [0, 1] (any array that slices to numpy),
    the compartment its stain sits in and its positivity threshold."""

    name: str
    values: Any
    compartment: str = "nuclear"
    threshold: float = 0.3


def render_ihc(he: Any, marker: Any, mpp: float, compartment: str = "nuclear",
               threshold: float = 0.3, dab_max: float = DAB_MAX,
               counterstain: float = COUNTERSTAIN, out: Optional[Any] = None,
               window: int = WINDOW_PX, look: Optional[IhcLook] = None) -> Any:
    """(H, W, 3) uint8 H&E + (H, W) marker in [0, 1] at `mpp` um/px -> (H, W, 3) uint8 IHC.

    `he` and `marker` may be any arrays that slice to numpy (numpy, zarr, a lazy view); the
    result is written into `out` (anything that takes numpy slice assignment) when given, so a
    region larger than memory is rendered window by window. `compartment` "diffuse" is the
    per-pixel wash of `render_dab_ihc`. `counterstain` scales the source's hematoxylin (1: as
    in the H&E); a `look` (a lab's IHC, `measure_ihc_look`) replaces it and `dab_max`.
    """
    outs, _ = render_ihc_cells(he, [MarkerMap("marker", marker, compartment, threshold)], mpp,
                               None if out is None else [out], dab_max=dab_max,
                               counterstain=counterstain, window=window, cells=False, look=look)
    return outs[0]


def render_ihc_cells(he: Any, markers: Sequence[MarkerMap], mpp: float,
                     outs: Optional[Sequence[Any]] = None, dab_max: float = DAB_MAX,
                     counterstain: float = COUNTERSTAIN, window: int = WINDOW_PX,
                     cells: bool = True,
                     keep: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                     look: Optional[IhcLook] = None,
                     ) -> tuple[list[Any], Optional[CellReadout]]:
    """`render_ihc` of several markers over one H&E, the cells segmented once per window for
    all of them, and (with `cells`) the cells themselves with each marker's level: the
    `CellReadout` the scores are computed from (`mupd.scores`), in this image's pixel-edge
    (x, y) coordinates. A cell belongs to the window its centre falls in, so a cell on a
    window seam is counted once; `keep` ((N, 2) centres -> (N,) bool) drops cells before
    their outlines are traced (e.g. those outside a region's polygon). With a `look`, the
    counterstain factors are fitted once, on the image's central `WINDOW_PX`, so windows agree."""
    shape = tuple(he.shape)
    for m in markers:
        if len(shape) != 3 or shape[2] != 3 or tuple(m.values.shape) != shape[:2]:
            raise ConditionError(f"cannot render DAB: H&E {shape} and marker map {tuple(m.values.shape)} "
                                 f"must be (H, W, 3) and (H, W)")
        if m.compartment != "diffuse" and m.compartment not in SPILL:
            raise ConditionError(f"cannot render DAB in compartment {m.compartment!r}; known: "
                                 f"{', '.join((*SPILL, 'diffuse'))}")
    H, W = shape[:2]
    outs = list(outs) if outs is not None else [np.empty((H, W, 3), dtype=np.uint8) for _ in markers]
    segment = cells or look is not None or any(m.compartment != "diffuse" for m in markers)
    scales = (counterstain, counterstain)
    # one window holding the whole image is the central crop the factors are fitted on: fit
    # them on its segmentation below rather than segment the image twice
    fit_in_window = H <= min(window, WINDOW_PX) and W <= min(window, WINDOW_PX)
    if look is not None:
        dab_max = look.dab_max
        if not fit_in_window:
            scales = counterstain_scales(he, mpp, look) or scales
    margin = int(math.ceil(MARGIN_UM / mpp)) if H > window or W > window else 0
    parts = []
    for y0 in range(0, H, window):
        for x0 in range(0, W, window):
            y1, x1 = min(y0 + window, H), min(x0 + window, W)
            ya, xa = max(y0 - margin, 0), max(x0 - margin, 0)
            yb, xb = min(y1 + margin, H), min(x1 + margin, W)
            hed = rgb2hed(np.asarray(he[ya:yb, xa:xb])[..., :3]).astype(np.float32)
            seg = segment_cells_hed(hed, mpp) if segment else None
            if look is not None and fit_in_window:
                scales = _matched_scales(hed, seg, mpp, look) or scales
            hema = hed[..., 0] * _scale_map(seg, scales)
            weights: dict[str, np.ndarray] = {}
            levels = {}
            for m, out in zip(markers, outs):
                values = np.clip(np.nan_to_num(np.asarray(m.values[ya:yb, xa:xb], dtype=np.float32)), 0, 1)
                if seg is not None:
                    levels[m.name] = seg.mean(values)
                if m.compartment == "diffuse":
                    dab = values * dab_max
                else:
                    if m.compartment not in weights:
                        weights[m.compartment] = compartment_weight(seg, m.compartment)
                    dab = cell_dab(seg, levels[m.name], weights[m.compartment], m.threshold, dab_max)
                rgb = _compose(np.stack([hema, np.zeros_like(dab), dab], axis=-1))
                out[y0:y1, x0:x1] = rgb[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
            if cells:
                parts.append(_window_cells(seg, levels, (ya, xa), (y0, y1, x0, x1), keep))
    return outs, (CellReadout.concat(parts) if cells else None)


def counterstain_scales(he: Any, mpp: float, look: IhcLook, side: int = WINDOW_PX
                        ) -> Optional[tuple[float, float]]:
    """(nuclei, rest of the tissue) factors that take the source H&E's median hematoxylin onto
    `look`'s, measured on the central `side` px of `he` (whatever the rendering's windows); None
    where that shows too few nuclei to measure (the caller keeps its default)."""
    H, W = he.shape[:2]
    h, w = min(H, side), min(W, side)
    y, x = (H - h) // 2, (W - w) // 2
    hed = rgb2hed(np.asarray(he[y:y + h, x:x + w])[..., :3]).astype(np.float32)
    return _matched_scales(hed, segment_cells_hed(hed, mpp), mpp, look)


def _matched_scales(hed: np.ndarray, seg: CellSegmentation, mpp: float, look: IhcLook
                    ) -> Optional[tuple[float, float]]:
    """`counterstain_scales` of a source already deconvolved and segmented."""
    try:
        source = _look_of(hed, seg, mpp, "source H&E")
    except ConditionError:
        return None
    return look.nucleus_h / source.nucleus_h, look.background_h / source.background_h


def _scale_map(seg: Optional[CellSegmentation], scales: tuple[float, float]) -> Any:
    """Per-pixel counterstain factor: `scales[0]` in nuclei, `scales[1]` elsewhere, the nuclei's
    edges as soft as the DAB's."""
    nucleus, rest = scales
    if nucleus == rest or seg is None:
        return np.float32(nucleus)
    inside = (seg.nuclei > 0).astype(np.float32)
    if EDGE_UM > 0:
        inside = ndi.gaussian_filter(inside, sigma=EDGE_UM / seg.mpp, truncate=3.0)
    return rest + (nucleus - rest) * inside


def _window_cells(seg: CellSegmentation, levels: dict[str, np.ndarray], corner: tuple[int, int],
                  core: tuple[int, int, int, int],
                  keep: Optional[Callable[[np.ndarray], np.ndarray]]) -> CellReadout:
    """The cells of one window whose centre lies in its core (image pixel-edge coordinates)."""
    (ya, xa), (y0, y1, x0, x1) = corner, core
    centre = seg.centroids()[1:]  # window (row, col) pixel centres
    xy = centre[:, ::-1] + (xa + 0.5, ya + 0.5)  # image pixel-edge (x, y)
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    if keep is not None and inside.any():
        inside[inside] = keep(xy[inside])
    ids = np.flatnonzero(inside) + 1
    rc, offsets = seg.outlines(ids)
    return CellReadout(xy[ids - 1], seg.areas_um2()[ids].astype(np.float32),
                       (rc[:, ::-1] + (xa + 0.5, ya + 0.5)).astype(np.float32), offsets,
                       {name: level[ids].astype(np.float32) for name, level in levels.items()})


def compartment_weight(seg: CellSegmentation, compartment: str) -> np.ndarray:
    """(H, W) share of a cell's DAB each pixel takes in `compartment` (`SPILL`)."""
    spill = SPILL[compartment]
    weight = np.where(seg.nuclei > 0, spill["nucleus"], spill["cytoplasm"]).astype(np.float32)
    if spill["membrane"] != spill["cytoplasm"]:
        weight[seg.membrane(MEMBRANE_UM) > 0] = spill["membrane"]
    return weight


def cell_dab(seg: CellSegmentation, level: np.ndarray, weight: np.ndarray, threshold: float,
             dab_max: float = DAB_MAX) -> np.ndarray:
    """(H, W) DAB optical density laid by cell: each cell's `level` (its mean predicted
    intensity), spread by the compartment `weight`, faint below `threshold`; none outside cells."""
    od = (dab_max * level * np.where(level >= threshold, 1.0, NEGATIVE_FRACTION)).astype(np.float32)
    od[0] = 0.0
    dab = od[seg.cells] * weight
    if EDGE_UM > 0:  # the optics' blur: stained edges a fraction of a micrometre soft
        dab = ndi.gaussian_filter(dab, sigma=EDGE_UM / seg.mpp, truncate=3.0)
    return dab


def _compose(hed: np.ndarray) -> np.ndarray:
    return np.clip(hed2rgb(hed) * 255.0, 0, 255).round().astype(np.uint8)
