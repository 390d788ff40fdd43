"""Nuclei and cells of a brightfield H&E image, by classical image analysis (scikit-image).

Nuclei are found in the hematoxylin optical density (Ruifrok-Johnston colour deconvolution,
`skimage.color.rgb2hed`) above its local background (an 8 um flat opening, like the rolling
ball of QuPath's cell detection): a threshold (Otsu over the tissue, between a floor and a level
that always counts), holes filled, touching nuclei split by a watershed on the distance
transform, then a size filter in um^2 and a thickness filter (fibres and keratin strands are
not nuclei). A cell is its nucleus grown by a bounded distance (`expand_labels`: each pixel
goes to the nearest nucleus within `expand_um`, never into another cell, never onto glass).

Every length is in micrometres and converted with the image's mpp, so the same settings hold
at any magnification. `CellSegmentation` is what per-cell read-outs need: the label images,
a cell's mean of any map (`mean`), its compartments (`cytoplasm`, `membrane`) and its geometry
(`centroids`, `areas_um2`, `outlines`) for per-cell read-outs (`mupd.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import find_contours
from skimage.segmentation import expand_labels, watershed

from .errors import ConditionError

#: Hematoxylin OD (skimage HED units), above the local background and in all, below which
#: nothing is a nucleus whatever Otsu says: the light counterstain of scikit-image's real IHC
#: image has nuclei at about 0.04 on a 0.01 background; an H&E nucleus is 0.1-0.3.
NUCLEUS_MIN_OD = 0.025
#: Hematoxylin above the local background that always makes a nucleus (Otsu over the tissue
#: decides below it: a pale counterstain): H&E nuclei stand 0.1-0.3 above their cytoplasm.
NUCLEUS_CONTRAST = 0.06
#: Smoothing of the hematoxylin before thresholding (Gaussian sigma, um).
SMOOTH_UM = 0.5
#: Background under the nuclei: a flat opening this wide on each side of a pixel (um).
BACKGROUND_UM = 8.0
#: Nucleus size range (um^2): below, debris and noise; above, dark non-nuclear areas the
#: watershed could not split (a lymphocyte nucleus is ~30 um^2, a large tumour nucleus ~150).
NUCLEUS_AREA_UM2 = (8.0, 250.0)
#: Growth of a nucleus into its cell (um): the cytoplasm of a typical epithelial cell.
EXPAND_UM = 4.0
#: Half the width (um) a nucleus must reach somewhere: thinner dark objects (fibres, the
#: strands of keratin) are not nuclei.
MIN_HALF_WIDTH_UM = 1.25
#: Two nuclei centres closer than this (um) are one nucleus for the watershed.
MIN_SEPARATION_UM = 3.0
#: Pixels with an optical density sum below this are glass: cells never grow onto it.
TISSUE_MIN_OD = 0.02


@dataclass
class CellSegmentation:
    """Label images (0 = none) of one image: `nuclei` and `cells` share ids, a cell holds its nucleus."""

    nuclei: np.ndarray  # (H, W) int32
    cells: np.ndarray  # (H, W) int32
    mpp: float
    hematoxylin: np.ndarray  # (H, W) float32 hematoxylin OD the nuclei were found in

    @property
    def n_cells(self) -> int:
        return int(self.cells.max(initial=0))

    def cytoplasm(self) -> np.ndarray:
        """Cell labels minus the nuclei (the cytoplasmic compartment)."""
        return np.where(self.nuclei > 0, 0, self.cells)

    def membrane(self, width_um: float = 1.0) -> np.ndarray:
        """Cell labels of a band `width_um` wide inside each cell's boundary, nuclei excluded."""
        return membrane_ring(self.cells, max(1, round(width_um / self.mpp)), exclude=self.nuclei > 0)

    def mean(self, values: np.ndarray, labels: Optional[np.ndarray] = None) -> np.ndarray:
        """Per-cell mean of `values` over `labels` (default the cells): index i is cell i (0: none)."""
        return label_means(self.cells if labels is None else labels, values, self.n_cells)

    def centroids(self) -> np.ndarray:
        """(n + 1, 2) (row, col) centre of each cell in pixel coordinates (row 0: none)."""
        rows, cols = np.indices(self.cells.shape, dtype=np.float64)
        return np.stack([label_means(self.cells, rows, self.n_cells),
                         label_means(self.cells, cols, self.n_cells)], axis=1)

    def areas_um2(self) -> np.ndarray:
        """(n + 1,) area of each cell in um^2 (index 0: none)."""
        return np.bincount(self.cells.ravel(), minlength=self.n_cells + 1) * self.mpp * self.mpp

    def outlines(self, ids: np.ndarray, tolerance_px: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Outlines of cells `ids`: ((K, 2) (row, col) vertices, (len(ids) + 1,) offsets), cell
        k's ring being vertices[offsets[k]:offsets[k + 1]] (open, on the pixel edges)."""
        return cell_outlines(self.cells, ids, tolerance_px)


def segment_cells(rgb: np.ndarray, mpp: float, *, expand_um: float = EXPAND_UM,
                  area_um2: tuple[float, float] = NUCLEUS_AREA_UM2,
                  min_od: float = NUCLEUS_MIN_OD) -> CellSegmentation:
    """Nuclei and cells of an (H, W, 3) uint8 brightfield image at `mpp` micrometres per pixel."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ConditionError(f"cell segmentation needs an (H, W, 3) RGB image, got {rgb.shape}")
    return segment_cells_hed(rgb2hed(rgb[..., :3]).astype(np.float32), mpp, expand_um=expand_um,
                             area_um2=area_um2, min_od=min_od)


def segment_cells_hed(hed: np.ndarray, mpp: float, *, expand_um: float = EXPAND_UM,
                      area_um2: tuple[float, float] = NUCLEUS_AREA_UM2,
                      min_od: float = NUCLEUS_MIN_OD) -> CellSegmentation:
    """`segment_cells` from the image's (H, W, 3) stain optical densities (`rgb2hed`)."""
    if not mpp or not np.isfinite(mpp) or mpp <= 0:
        raise ConditionError(f"cell segmentation needs the image's microns per pixel, got {mpp}")
    hema = np.clip(hed[..., 0], 0, None)
    tissue = hed.clip(0, None).sum(axis=2) > TISSUE_MIN_OD
    nuclei = segment_nuclei(hema, mpp, tissue=tissue, area_um2=area_um2, min_od=min_od)
    cells = expand_labels(nuclei, distance=expand_um / mpp)
    cells[~tissue & (nuclei == 0)] = 0
    return CellSegmentation(nuclei=nuclei, cells=cells, mpp=float(mpp), hematoxylin=hema)


def segment_nuclei(hema: np.ndarray, mpp: float, tissue: Optional[np.ndarray] = None,
                   area_um2: tuple[float, float] = NUCLEUS_AREA_UM2,
                   min_od: float = NUCLEUS_MIN_OD) -> np.ndarray:
    """(H, W) int32 nucleus labels from a hematoxylin OD image (threshold + distance watershed)."""
    px_area = mpp * mpp
    smooth = ndi.gaussian_filter(hema, sigma=max(0.5, SMOOTH_UM / mpp))
    # background subtraction (a flat-top opening, the rolling ball of QuPath's cell detection):
    # a cytoplasm that takes hematoxylin (squamous epithelium, mucin) is not a nucleus
    side = max(3, 2 * round(BACKGROUND_UM / mpp) + 1)
    contrast = smooth - ndi.grey_opening(smooth, size=(side, side))
    region = tissue if tissue is not None and tissue.any() else np.ones(hema.shape, bool)
    values = np.minimum(contrast[region], 4 * NUCLEUS_CONTRAST)  # black debris skews Otsu
    level = NUCLEUS_CONTRAST
    if values.size > 16 and np.ptp(values) > 0:
        level = min(max(min_od, float(threshold_otsu(values))), NUCLEUS_CONTRAST)
    mask = ndi.binary_fill_holes((contrast > level) & (smooth > min_od))
    blobs, _ = ndi.label(mask)
    small = np.bincount(blobs.ravel()) * px_area < area_um2[0]  # debris (a version-free filter)
    small[0] = True
    blobs[small[blobs]] = 0
    mask = blobs > 0
    if not mask.any():
        return np.zeros(hema.shape, dtype=np.int32)
    raw = ndi.distance_transform_edt(mask)
    dist = ndi.gaussian_filter(raw, sigma=max(0.5, SMOOTH_UM / mpp))
    # seeds: maxima of the distance over a MIN_SEPARATION_UM window (a plateau is one seed);
    # one filter over the image rather than skimage's peak_local_max, which loops over blobs
    side = max(3, 2 * round(MIN_SEPARATION_UM / mpp / 2) + 1)
    peaks = mask & (dist >= ndi.maximum_filter(dist, size=side))
    markers, n = ndi.label(peaks, structure=np.ones((3, 3), bool))
    # a blob whose maximum a bigger neighbour's window hides still gets one seed
    n_blobs = int(blobs.max()) + 1
    missing = np.flatnonzero((np.bincount(blobs.ravel(), minlength=n_blobs) > 0)
                             & (np.bincount(blobs[markers > 0], minlength=n_blobs) == 0))
    missing = missing[missing > 0]
    if missing.size:
        extra = ndi.maximum_position(dist, blobs, missing)
        for k, pos in enumerate(extra, start=n + 1):
            markers[pos] = k
    labels = watershed(-dist, markers, mask=mask).astype(np.int32)
    areas = np.bincount(labels.ravel()) * px_area
    half_width = np.zeros(len(areas))
    inside = labels > 0
    np.maximum.at(half_width, labels[inside], raw[inside] * mpp)
    bad = (areas < area_um2[0]) | (areas > area_um2[1]) | (half_width < MIN_HALF_WIDTH_UM)
    bad[0] = True
    labels[bad[labels]] = 0
    return relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in the order of their ids (0 stays 0)."""
    ids = np.flatnonzero(np.bincount(labels.ravel()))
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def label_means(labels: np.ndarray, values: np.ndarray, n: Optional[int] = None) -> np.ndarray:
    """Mean of `values` per label id 0..n (ids with no pixel: 0)."""
    n = int(labels.max(initial=0)) if n is None else n
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[: n + 1]
    sums = np.bincount(flat, weights=np.asarray(values, dtype=np.float64).ravel(), minlength=n + 1)[: n + 1]
    return np.divide(sums, counts, out=np.zeros(n + 1), where=counts > 0)


def cell_outlines(labels: np.ndarray, ids: np.ndarray,
                  tolerance_px: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """`CellSegmentation.outlines` for any label image: the marching-squares contour of each
    label's mask (its longest, should a label come in pieces), simplified by `tolerance_px`
    (shapely, Douglas-Peucker, in one vectorised call)."""
    import shapely

    ids = np.asarray(ids, dtype=np.int64)
    boxes = ndi.find_objects(labels, max_label=int(ids.max(initial=0)))
    rings = []
    for i in ids:
        box = boxes[i - 1] if 0 < i <= len(boxes) else None
        if box is None:
            raise ConditionError(f"cell {i} is not in the label image")
        mask = np.pad(labels[box] == i, 1).astype(np.float32)
        ring = max(find_contours(mask, 0.5), key=len)
        rings.append(ring + (box[0].start - 1, box[1].start - 1))
    if not rings:
        return np.zeros((0, 2)), np.zeros(1, dtype=np.int64)
    lengths = [len(r) for r in rings]
    polygons = shapely.polygons(shapely.linearrings(np.concatenate(rings),
                                                    indices=np.repeat(np.arange(len(rings)), lengths)))
    coords, index = shapely.get_coordinates(shapely.simplify(polygons, tolerance_px), return_index=True)
    # drop each ring's closing vertex (shapely repeats the first)
    ends = np.flatnonzero(np.r_[index[1:] != index[:-1], True])
    keep = np.ones(len(coords), bool)
    keep[ends] = False
    counts = np.bincount(index[keep], minlength=len(rings))
    return coords[keep], np.r_[0, np.cumsum(counts)].astype(np.int64)


def membrane_ring(cells: np.ndarray, width: int, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """Cell labels of the pixels within `width` px of a different label (another cell or none)."""
    yy, xx = np.mgrid[-width : width + 1, -width : width + 1]
    disk = (yy * yy + xx * xx) <= width * width + width  # a round footprint
    hi = ndi.maximum_filter(cells, footprint=disk, mode="nearest")
    lo = ndi.minimum_filter(cells, footprint=disk, mode="nearest")
    ring = np.where((cells > 0) & ((hi != cells) | (lo != cells)), cells, 0)
    if exclude is not None:
        ring[exclude] = 0
    return ring
