"""Spatial transcriptomics -> one `SpotTable`: an AnnData of spots with their image and scale.

Three layouts are read into the same shape, so tiles, marker maps and captions are made once:
the HER2ST legacy ST folders, 10x Visium spaceranger folders and `.h5ad` files with
`obsm['spatial']`. A SpotTable has

- `X`: counts (spots x genes, CSR float32); `uns['mupd']['normalized']` says whether they are raw
  UMIs or already log-normalised (then `normalize_log_cpm` leaves them alone);
- `obs`: `patient`, `section`, `x_px`, `y_px` (spot centre in the image's pixels),
  `spot_diameter_px`, and `label` where a pathologist region label exists;
- `uns['mupd']`: `image_path`, `mpp` (um per image pixel), `source`, `masked_boxes` (image areas
  that are not tissue of the section and must be hidden, e.g. HER2ST A1's pasted thumbnail).

Genes are matched case-insensitively; genes of a requested panel that the table lacks are
returned as NaN (masked) with a `MissingGenesWarning` naming them, never as silent zeros.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

from ..errors import DataError
from .crops import crop_spots, image_size
from .sections import SPOT_DIAMETER_UM, her2st_root, load_section, masked_box

#: Visium spots are 55 um across (10x spec); spaceranger gives their diameter in full-res pixels.
VISIUM_SPOT_UM = 55.0
#: Largest share of spots allowed outside the image before a table is refused as mis-scaled.
MAX_OUTSIDE = 0.05


class MissingGenesWarning(UserWarning):
    """Genes of a requested panel that a spot table does not have (they are masked as NaN)."""


def spot_table(counts, genes: Sequence[str], obs: pd.DataFrame, image_path: Path, mpp: float,
               source: str, normalized: bool = False,
               masked_boxes: Sequence[tuple[int, int, int, int]] = ()) -> ad.AnnData:
    """Validate and assemble a SpotTable; spots outside the image are dropped (a few) or refused."""
    image_path = Path(image_path)
    if not image_path.exists():
        raise DataError(f"spot image {image_path} does not exist")
    if not (np.isfinite(mpp) and mpp > 0):
        raise DataError(f"spot image {image_path}: mpp must be a positive number, got {mpp}")
    missing = [c for c in ("patient", "section", "x_px", "y_px", "spot_diameter_px") if c not in obs]
    if missing:
        raise DataError(f"spot table for {image_path} lacks obs columns {missing}")
    X = sparse.csr_matrix(counts, dtype=np.float32)
    if X.shape != (len(obs), len(genes)):
        raise DataError(f"spot table for {image_path}: counts {X.shape} do not match "
                        f"{len(obs)} spots x {len(genes)} genes")
    width, height = image_size(image_path)
    inside = ((obs.x_px >= 0) & (obs.x_px < width) & (obs.y_px >= 0) & (obs.y_px < height)).to_numpy()
    if (~inside).mean() > MAX_OUTSIDE:
        raise DataError(f"{(~inside).sum()} of {len(obs)} spots lie outside image {image_path} "
                        f"({width}x{height} px): wrong image or scale factor?")
    if not inside.all():
        warnings.warn(f"{(~inside).sum()} spots lie outside {image_path}; dropped", stacklevel=2)
    table = ad.AnnData(X=X[inside], obs=obs.loc[inside].copy(),
                       var=pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")))
    table.var_names_make_unique()
    table.obs_names = table.obs_names.astype(str)
    table.uns["mupd"] = {"image_path": str(image_path), "mpp": float(mpp), "source": source,
                         "normalized": bool(normalized),
                         "masked_boxes": [list(map(int, b)) for b in masked_boxes]}
    return table


def her2st_spots(data_root: Path, section: str) -> ad.AnnData:
    """A HER2ST section with an H&E image (C2..C6, B4, A1): raw counts, region labels if any."""
    s = load_section(data_root, section)
    obs = pd.DataFrame({"patient": s.patient, "section": section, "x_px": s.spots.image_x,
                        "y_px": s.spots.image_y, "spot_diameter_px": SPOT_DIAMETER_UM / s.mpp,
                        "array_x": s.spots.array_x, "array_y": s.spots.array_y},
                       index=s.spots.index)
    labels = her2st_root(data_root) / "labels" / f"{section}_labeled_coordinates.tsv"
    if labels.exists():
        table = pd.read_csv(labels, sep="\t").dropna(subset=["x", "y"])
        keys = [f"{round(x)}x{round(y)}" for x, y in zip(table.x, table.y)]
        obs["label"] = pd.Series(table["label"].to_numpy(), index=keys).groupby(level=0).first() \
            .reindex(obs.index)
    box = masked_box(section)
    return spot_table(s.counts.to_numpy(), list(s.counts.columns), obs, s.image_path, s.mpp,
                      "her2st", masked_boxes=[box] if box else ())


def read_10x_h5(path: Path) -> tuple[sparse.csr_matrix, list[str], list[str]]:
    """(barcodes x genes counts, barcodes, gene symbols) of a 10x `filtered_feature_bc_matrix.h5`
    (the documented CSC layout: `matrix/{data,indices,indptr,shape,barcodes,features/name}`)."""
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(v) for v in m["shape"][:])
            csc = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
            barcodes = [b.decode() for b in m["barcodes"][:]]
            names = [g.decode() for g in m["features/name"][:]]
            kinds = [k.decode() for k in m["features/feature_type"][:]] \
                if "feature_type" in m["features"] else ["Gene Expression"] * len(names)
    except (OSError, KeyError) as exc:
        raise DataError(f"{path} is not a 10x feature-barcode matrix (.h5): {exc}") from None
    keep = np.array([k == "Gene Expression" for k in kinds])
    return csc.T.tocsr()[:, keep], barcodes, [n for n, k in zip(names, keep) if k]


def read_visium(folder: Path, image: str = "auto", patient: Optional[str] = None,
                section: Optional[str] = None) -> ad.AnnData:
    """A spaceranger output folder (1.x `tissue_positions_list.csv` or 2.x `tissue_positions.csv`),
    placed on its `hires` or `lowres` image (positions are scaled from full resolution).

    `auto` takes the hires image unless it is blank (some public test folders ship a black
    placeholder), then the lowres one."""
    folder = Path(folder)
    spatial = folder / "spatial"
    h5 = folder / "filtered_feature_bc_matrix.h5"
    if not h5.exists() or not spatial.is_dir():
        raise DataError(f"{folder} is not a spaceranger folder (needs filtered_feature_bc_matrix.h5 "
                        "and spatial/)")
    if image == "auto":
        image = "hires" if _has_content(spatial / "tissue_hires_image.png") else "lowres"
    if image not in ("hires", "lowres"):
        raise DataError(f"Visium image must be 'auto', 'hires' or 'lowres', got {image!r}")
    counts, barcodes, genes = read_10x_h5(h5)
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]
    if new.exists():
        pos = pd.read_csv(new, header=0, names=columns)
    elif old.exists():
        pos = pd.read_csv(old, header=None, names=columns)
    else:
        raise DataError(f"{spatial} has no tissue_positions(.csv|_list.csv)")
    pos = pos.set_index("barcode").reindex(barcodes)
    if pos["pxl_row"].isna().any():
        raise DataError(f"{pos['pxl_row'].isna().sum()} barcodes of {h5} have no position in {spatial}")
    scale = float(factors[f"tissue_{image}_scalef"])
    fullres_mpp = VISIUM_SPOT_UM / float(factors["spot_diameter_fullres"])
    name = section or folder.name
    obs = pd.DataFrame({"patient": patient or name, "section": name,
                        "x_px": pos.pxl_col.to_numpy(float) * scale,
                        "y_px": pos.pxl_row.to_numpy(float) * scale,
                        "spot_diameter_px": float(factors["spot_diameter_fullres"]) * scale,
                        "array_x": pos.array_col.to_numpy(), "array_y": pos.array_row.to_numpy()},
                       index=barcodes)
    return spot_table(counts, genes, obs, spatial / f"tissue_{image}_image.png",
                      fullres_mpp / scale, "visium")


def _has_content(path: Path) -> bool:
    if not path.exists():
        return False
    with Image.open(path) as im:
        lo, hi = np.percentile(np.asarray(im.convert("L")), [1, 99])
    return bool(hi - lo > 10)


def read_spatial_h5ad(path: Path, image: Path, mpp: Optional[float] = None,
                      spot_diameter_um: float = VISIUM_SPOT_UM, patient: Optional[str] = None,
                      section: Optional[str] = None) -> ad.AnnData:
    """An `.h5ad` whose `obsm['spatial']` holds (x, y) spot centres in `image` pixels.

    `mpp` defaults to the Visium spot size over `uns['spatial'][*]['scalefactors']
    ['spot_diameter_fullres']` (full-resolution image). Non-integer `X` is taken as already
    normalised (log1p-style) and flagged so.
    """
    path = Path(path)
    try:
        data = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .h5ad: {exc}") from None
    if "spatial" not in data.obsm:
        raise DataError(f"{path} has no obsm['spatial'] spot coordinates")
    libraries = data.uns.get("spatial", {})
    factors = next(iter(libraries.values()), {}).get("scalefactors", {}) if libraries else {}
    if mpp is None:
        if "spot_diameter_fullres" not in factors:
            raise DataError(f"{path} has no scalefactors to derive the pixel size; pass mpp")
        mpp = spot_diameter_um / float(factors["spot_diameter_fullres"])
    counts = data.X if sparse.issparse(data.X) else np.asarray(data.X)
    values = counts.data if sparse.issparse(counts) else counts
    normalized = bool(np.any(values != np.round(values)))
    xy = np.asarray(data.obsm["spatial"], dtype=float)
    name = section or path.stem
    obs = pd.DataFrame({"patient": patient or name, "section": name, "x_px": xy[:, 0],
                        "y_px": xy[:, 1], "spot_diameter_px": spot_diameter_um / mpp},
                       index=data.obs_names)
    return spot_table(counts, list(data.var_names), obs, image, mpp, "h5ad", normalized=normalized)


def normalize_log_cpm(table: ad.AnnData) -> ad.AnnData:
    """log1p(counts per million) per spot; a table already normalised is returned as is."""
    if table.uns["mupd"]["normalized"]:
        return table
    depth = np.asarray(table.X.sum(axis=1)).ravel()
    out = table.copy()
    out.X = sparse.csr_matrix(sparse.diags(1e6 / np.maximum(depth, 1)) @ table.X, dtype=np.float32)
    out.X.data = np.log1p(out.X.data)
    out.obs["depth"] = depth
    out.uns["mupd"] = {**table.uns["mupd"], "normalized": True}
    return out


def panel_values(table: ad.AnnData, genes: Sequence[str]) -> np.ndarray:
    """(spots, len(genes)) float32 of the table's values; genes it lacks are NaN and named in a
    MissingGenesWarning (a gene absent from the table was not measured there, it is not a zero)."""
    index = {g.upper(): i for i, g in reversed(list(enumerate(table.var_names)))}
    cols = [index.get(str(g).upper(), -1) for g in genes]
    absent = [g for g, c in zip(genes, cols) if c < 0]
    if absent:
        section = ",".join(sorted(set(map(str, table.obs["section"]))))
        shown = ", ".join(absent[:20]) + (" ..." if len(absent) > 20 else "")
        warnings.warn(f"{len(absent)} of {len(genes)} panel genes are absent from section {section} "
                      f"and masked: {shown}", MissingGenesWarning, stacklevel=2)
    out = np.full((table.n_obs, len(genes)), np.nan, dtype=np.float32)
    present = [i for i, c in enumerate(cols) if c >= 0]
    if present:
        out[:, present] = table.X[:, [cols[i] for i in present]].toarray()
    return out


def spot_tiles(table: ad.AnnData, tile_size: int, mpp: float,
               spots: Optional[Sequence[str]] = None) -> np.ndarray:
    """(N, T, T, 3) uint8 tiles at `mpp` centred on the spots (all, or the named ones)."""
    info = table.uns["mupd"]
    obs = table.obs if spots is None else table.obs.loc[list(spots)]
    return crop_spots(Path(info["image_path"]), obs[["x_px", "y_px"]].to_numpy(float), tile_size,
                      info["mpp"], mpp, masked=[tuple(b) for b in info.get("masked_boxes", [])])
