"""Marker targets from spot RNA: per-marker intensity maps of a tile plus where they are measured.

A spot measures the mean expression over its footprint (100 um legacy ST, 55 um Visium); between
spots nothing is measured. A tile's map for a marker is built in three steps:

1. paint each spot's normalised expression (log1p CPM) of the marker's gene over its footprint;
2. smooth with a normalised Gaussian (kernel regression, `sigma_um`), dividing by the kernel
   weight but by no less than the weight at the edge of a lone footprint: inside an isolated
   footprint the value is the spot's own, between touching spots it blends, and beyond the
   footprints it fades smoothly to 0 (no step where the weight runs out);
3. divide by the gene's scale and clip to [0, 1]. The scale is the 99th percentile of the gene
   over the *training* spots (`fit_marker_scales`; its maximum when the 99th percentile is 0, 1
   when never detected); held-out data reuse the training scales.

`valid` is True only inside footprints of spots whose gene was measured: losses and metrics
should use it, as the smoothed values between spots are an interpolation, not a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
from scipy import ndimage as ndi

from ..errors import DataError
from ..paths import STAIN_CATALOGUE
from .spatial import panel_values

#: Gaussian smoothing of painted footprints (um): softens spot borders, blends touching spots.
SIGMA_UM = 15.0
SCALE_PERCENTILE = 99.0


def marker_genes(catalogue: Path = STAIN_CATALOGUE) -> dict[str, str]:
    """Catalogue marker name -> gene symbol (e.g. HER2 -> ERBB2)."""
    entries = json.loads(Path(catalogue).read_text())["targets"]
    return {e["name"]: e["gene"] for e in entries if e["kind"] == "marker" and e.get("gene")}


def fit_marker_scales(values: np.ndarray, names: Sequence[str],
                      percentile: float = SCALE_PERCENTILE) -> dict[str, float]:
    """Per-marker scale (the `percentile` of measured spot values); fit on training spots only.

    A marker whose gene no spot measured gets no scale (it is left out of the store rather
    than trained on as zeros); one detected in fewer than 1% of spots is scaled by its maximum.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise DataError(f"marker values must be (spots, {len(names)}), got {values.shape}")
    scales = {}
    for i, name in enumerate(names):
        measured = values[:, i][np.isfinite(values[:, i])]
        if measured.size == 0:
            continue
        top = float(np.percentile(measured, percentile))
        scales[name] = top if top > 0 else float(measured.max()) if measured.max() > 0 else 1.0
    return scales


def render_marker_maps(centres: np.ndarray, values: np.ndarray, scales: Sequence[float],
                       tile_size: int, mpp: float, spot_diameter_um: float,
                       sigma_um: float = SIGMA_UM) -> tuple[np.ndarray, np.ndarray]:
    """(maps (M, T, T) float32 in [0, 1], valid (M, T, T) bool) of spots at `centres` (tile px).

    `values` (spots, M) are normalised expression, NaN where the gene was not measured.
    """
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    values = np.asarray(values, dtype=float).reshape(len(centres), len(scales))
    if not len(centres):
        shape = (len(scales), tile_size, tile_size)
        return np.zeros(shape, np.float32), np.zeros(shape, bool)
    sigma = sigma_um / mpp
    radius = max(spot_diameter_um / mpp / 2, 0.5)
    pad = int(np.ceil(3 * sigma + radius))
    size = tile_size + 2 * pad
    yy, xx = np.mgrid[:size, :size] + 0.5 - pad
    inner = (slice(pad, pad + tile_size),) * 2
    # Smoothing is linear: blur each spot's footprint once, then weight it by the spot's values.
    disks = np.stack([np.hypot(xx - cx, yy - cy) <= radius for cx, cy in centres]).astype(np.float32)
    blurred = np.stack([ndi.gaussian_filter(d, sigma, mode="constant") if sigma > 0 else d
                        for d in disks])[(slice(None), *inner)]
    measured = np.isfinite(values).astype(np.float32)
    acc = np.einsum("sm,shw->mhw", np.nan_to_num(values), blurred)
    weight = np.einsum("sm,shw->mhw", measured, blurred)
    valid = np.einsum("sm,shw->mhw", measured, disks[(slice(None), *inner)]) > 0
    lone = (np.hypot(xx - tile_size / 2, yy - tile_size / 2) <= radius).astype(np.float32)
    blurred_lone = ndi.gaussian_filter(lone, sigma, mode="constant") if sigma > 0 else lone
    edge = float(blurred_lone[lone > 0].min())  # weight at the rim of a lone footprint
    level = acc / np.maximum(weight, edge)
    scale = np.asarray(scales, dtype=float)[:, None, None]
    return np.clip(level / scale, 0, 1).astype(np.float32), valid


def tile_marker_maps(table: ad.AnnData, centre: tuple[float, float], tile_size: int, mpp: float,
                     genes: Sequence[str], scales: Sequence[float],
                     sigma_um: float = SIGMA_UM) -> tuple[np.ndarray, np.ndarray]:
    """Marker maps of the tile of `tile_size` px at `mpp` centred on image pixel `centre`, from
    the spots of a normalised SpotTable that reach it."""
    if not table.uns["mupd"]["normalized"]:
        raise DataError("marker maps need normalised expression: pass normalize_log_cpm(table)")
    image_mpp = table.uns["mupd"]["mpp"]
    xy = table.obs[["x_px", "y_px"]].to_numpy(float)
    diameter_um = float(table.obs["spot_diameter_px"].iloc[0]) * image_mpp
    reach = (tile_size * mpp / 2 + diameter_um + 3 * sigma_um) / image_mpp
    near = np.flatnonzero(np.all(np.abs(xy - np.asarray(centre)) <= reach, axis=1))
    local = (xy[near] - np.asarray(centre)) * image_mpp / mpp + tile_size / 2
    values = panel_values(table[near], genes) if len(near) else np.zeros((0, len(genes)))
    return render_marker_maps(local, values, scales, tile_size, mpp, diameter_um, sigma_um)


def spot_level(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-marker mean over the valid pixels (NaN where none): the spot-scale value of a map."""
    count = valid.sum(axis=(-2, -1))
    total = np.where(valid, maps, 0).sum(axis=(-2, -1))
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)
