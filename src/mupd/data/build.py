"""Build patch stores: spot-centred tiles from spatial transcriptomics, or tissue tiles of slides.

Spot stores hold, per spot that lies on tissue: the H&E tile, the spot's RNA over a gene panel
(log1p CPM, NaN where the section lacks the gene), marker maps painted from the spot RNA
(`markers.py`) and, for HER2ST, a derived caption (`captions.py`). The `reference` (marker
scales and caption cuts) is fitted on all spots of the sections being built when it is not
given; for held-out stores pass the reference of the training store, so nothing of a held-out
patient ever shapes a scale or a cut.

Pair stores hold H&E tiles with the pixel-aligned tiles of one other stain (`targets`), from
paired folders or from a serial section registered onto the H&E by landmarks.

Manifest columns: patient, slide, x, y (spot centre or tile corner in level-0 pixels of the
slide/image), slide_mpp (um per level-0 pixel), mpp (um per tile pixel), tile_size, source,
plus spot, label (region label where known), pair (the other stain's file) and caption.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import DataError
from ..progress import ProgressCallback, ProgressEvent, no_progress
from .captions import DERIVED_CAPTIONS, fit_caption_cuts, her2st_captions
from .crops import load_rgb
from .markers import fit_marker_scales, marker_genes, tile_marker_maps
from .pairs import Registration, pair_tiles
from .spatial import MissingGenesWarning, her2st_spots, normalize_log_cpm, panel_values, spot_tiles
from .store import append_patch_store, write_patch_store
from .tiling import read_tiles, tile_grid
from .tissue import is_tissue

#: The 785-gene HER2ST benchmark panel (HisToGene / Hist2ST) inside the data folder.
HER2ST_PANEL = "st/her2st/Hist2ST_her_hvg_cut_1000.npy"


def fit_reference(tables: Sequence[ad.AnnData], captions: bool) -> dict:
    """Marker scales (99th percentile) and caption tertile cuts over all spots of `tables`.

    Markers whose gene none of the tables measured are listed under `unmeasured` and get no
    scale, so stores built with this reference hold no map for them."""
    genes = marker_genes()
    names = list(genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingGenesWarning)  # reported per section when built
        levels = np.concatenate([panel_values(normalize_log_cpm(t), list(genes.values()))
                                 for t in tables])
    scales = fit_marker_scales(levels, names)
    reference = {"scales": scales, "unmeasured": [m for m in names if m not in scales],
                 "fitted_on": sorted({str(s) for t in tables for s in t.obs["section"]})}
    if captions:
        reference["caption_cuts"] = fit_caption_cuts(levels, names)
    return reference


def _sample(ids: list[str], n: Optional[int], rng: np.random.Generator) -> list[str]:
    if n is None or n >= len(ids):
        return ids
    return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]


def build_spot_store(tables: Sequence[ad.AnnData], out: Path, tile_size: int = 128,
                     mpp: float = 1.0, panel: Optional[Sequence[str]] = None,
                     reference: Optional[dict] = None, derive_captions: bool = False,
                     captions: Optional[Mapping[str, str]] = None,
                     max_spots: Optional[int] = None, seed: int = 0, overwrite: bool = False,
                     progress: ProgressCallback = no_progress,
                     caption_markers: int = 0) -> tuple[Path, dict]:
    """Spot-centred store from SpotTables; returns its path and the reference used.

    `captions` (spot id -> text, e.g. from `read_captions`) are given captions; `derive_captions`
    derives HER2ST captions from marker levels instead. Spots whose tile fails `is_tissue`
    are dropped.
    """
    if not tables:
        raise DataError("no spot tables to build a store from")
    if derive_captions and captions is not None:
        raise DataError("captions are either given (a captions file) or derived, not both")
    panel = list(panel) if panel is not None else list(dict.fromkeys(
        g for t in tables for g in t.var_names))
    reference = reference or fit_reference(tables, derive_captions)
    if derive_captions and "caption_cuts" not in reference:
        raise DataError(f"reference fitted on {reference.get('fitted_on')} has no caption cuts")
    genes_of = marker_genes()
    unknown = sorted(set(reference["scales"]) - set(genes_of))
    if unknown:
        raise DataError(f"reference fitted on {reference.get('fitted_on')} scales markers "
                        f"{unknown} that the stain catalogue does not know")
    names = [m for m in genes_of if m in reference["scales"]]  # catalogue order
    scales = [reference["scales"][m] for m in names]
    genes = [genes_of[m] for m in names]
    all_names = list(genes_of)
    caption_origin = (DERIVED_CAPTIONS if derive_captions
                      else "given (captions file)" if captions is not None else "none")
    rng = np.random.default_rng(seed)
    path = Path(out)
    for k, table in enumerate(tables):
        section = str(table.obs["section"].iloc[0])
        info = table.uns["mupd"]
        ids = _sample(list(table.obs_names), max_spots, rng)
        tiles = spot_tiles(table, tile_size, mpp, ids)
        keep = np.array([is_tissue(t) for t in tiles])
        if not keep.any():
            hint = (f"; its image is {info['mpp']:.2g} um/px, so {mpp} um/px tiles are upsampled "
                    f"{info['mpp'] / mpp:.1f}x and too blurred for the texture test: use a "
                    f"coarser --mpp" if info["mpp"] > 2 * mpp else "")
            raise DataError(f"section {section}: none of {len(ids)} spot tiles passed the tissue "
                            f"test{hint}")
        ids = [i for i, ok in zip(ids, keep) if ok]
        full = normalize_log_cpm(table)
        norm = full[ids]
        rna = panel_values(norm, panel)
        centres = norm.obs[["x_px", "y_px"]].to_numpy(float)
        manifest = pd.DataFrame({
            "patient": norm.obs["patient"].astype(str).to_numpy(), "slide": section,
            "x": centres[:, 0], "y": centres[:, 1], "slide_mpp": info["mpp"], "mpp": float(mpp),
            "tile_size": int(tile_size), "source": f"{info['source']}-spot", "spot": list(ids)})
        if "label" in norm.obs:
            manifest["label"] = norm.obs["label"].to_numpy()
        if derive_captions:
            levels = panel_values(norm, [genes_of[m] for m in all_names])  # warns if one is absent
            manifest["caption"] = her2st_captions(levels, all_names, reference["caption_cuts"],
                                                  list(ids), manifest.get("label"), caption_markers)
        elif captions is not None:
            manifest["caption"] = [captions.get(str(i), "") for i in ids]
        records: dict = {"rna": rna}
        if names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MissingGenesWarning)  # masked as not valid
                maps, valid = zip(*(tile_marker_maps(full, (x, y), tile_size, mpp, genes, scales)
                                    for x, y in centres))
            records.update(markers=np.stack(maps), marker_valid=np.stack(valid))
        if k == 0:
            write_patch_store(path, tiles[keep], manifest, marker_names=names,
                              marker_scales={m: reference["scales"][m] for m in names},
                              genes=panel, rna_normalized=True, overwrite=overwrite,
                              attrs={"reference": reference, "tile_mpp": mpp,
                                     "captions": caption_origin}, **records)
        else:
            append_patch_store(path, tiles[keep], manifest, **records)
        progress(ProgressEvent("sections", k + 1, len(tables), f"{section}: {len(ids)} spot tiles"))
    return path, reference


def build_her2st_store(data_root: Path, out: Path, sections: Sequence[str], tile_size: int = 128,
                       mpp: float = 1.0, reference: Optional[dict] = None,
                       max_spots: Optional[int] = None, seed: int = 0, overwrite: bool = False,
                       progress: ProgressCallback = no_progress,
                       caption_markers: int = 0) -> tuple[Path, dict]:
    """HER2ST sections with H&E (C2..C6 train; B4, A1 held out) on the 785-gene panel plus the
    catalogue's marker genes (most are not in it), so a gene readout learns the markers too."""
    panel_file = Path(data_root) / HER2ST_PANEL
    if not panel_file.exists():
        raise DataError(f"HER2ST gene panel {panel_file} is missing")
    panel = list(dict.fromkeys([*(str(g) for g in np.load(panel_file, allow_pickle=False)),
                                *marker_genes().values()]))
    tables = [her2st_spots(Path(data_root), name) for name in sections]
    return build_spot_store(tables, out, tile_size, mpp, panel=panel, reference=reference,
                            derive_captions=True, max_spots=max_spots, seed=seed,
                            overwrite=overwrite, progress=progress,
                            caption_markers=caption_markers)


def build_slide_store(slide, out: Path, mpp: float, tile_size: int, patient: str,
                      overlap: int = 0, max_tiles: Optional[int] = None,
                      caption: Optional[str] = None, overwrite: bool = False,
                      append: bool = False) -> Path:
    """Tissue tiles of a `mupd.io` Slide (no RNA, no markers): H&E for generation training.

    `caption` (e.g. the slide's entry of a captions file) is given to every tile of the slide."""
    grid = tile_grid(slide, mpp, tile_size, overlap)
    grid, tiles = read_tiles(slide, grid, limit=max_tiles)
    if not len(tiles):
        raise DataError(f"slide {slide.path}: no tile at {mpp} um/px passed the tissue test")
    manifest = pd.DataFrame({"patient": str(patient), "slide": Path(slide.path).name,
                             "x": grid.x, "y": grid.y, "slide_mpp": slide.mpp[0], "mpp": float(mpp),
                             "tile_size": int(tile_size), "source": "wsi-tile",
                             "tissue_fraction": grid.tissue_fraction})
    if caption is not None:
        manifest["caption"] = caption
    if append:
        return append_patch_store(out, tiles, manifest)
    return write_patch_store(out, tiles, manifest, overwrite=overwrite,
                             attrs={"tile_mpp": mpp, "captions": "given (captions file)"
                                    if caption is not None else "none"})


def build_pair_store(pairs: Sequence[tuple[Path, Path]], out: Path, stain: str, image_mpp: float,
                     mpp: float, tile_size: int, patient: Optional[str] = None,
                     registration: Optional[Registration] = None,
                     max_tiles: Optional[int] = None, overwrite: bool = False) -> Path:
    """H&E tiles + `stain` tiles of pixel-aligned pairs (or of one serial pair when
    `registration` maps the H&E frame onto the other section); only H&E tissue tiles are kept.

    `patient` defaults to each H&E file's stem: public pair sets (BCI, MIST) publish no patient
    ids, so every image is its own patient for splits unless told otherwise."""
    if registration is not None and len(pairs) != 1:
        raise DataError(f"a registration belongs to one serial pair, got {len(pairs)} pairs")
    scale = mpp / image_mpp
    rows, he_tiles, target_tiles = [], [], []
    for he_path, target_path in pairs:
        he, other = np.asarray(load_rgb(str(he_path))), np.asarray(load_rgb(str(target_path)))
        covered = None
        if registration is not None:
            other, covered = registration.warp(other, he.shape[:2])
        left = None if max_tiles is None else max_tiles - sum(map(len, he_tiles))
        if left == 0:
            break
        xy, a, b = pair_tiles(he, other, tile_size, scale, covered=covered, limit=left)
        rows.append(pd.DataFrame({
            "patient": patient or Path(he_path).stem, "slide": Path(he_path).name,
            "x": xy[:, 0], "y": xy[:, 1], "slide_mpp": float(image_mpp), "mpp": float(mpp),
            "tile_size": int(tile_size),
            "source": "serial-registered" if registration is not None else "pair-folder",
            "pair": Path(target_path).name}))
        he_tiles.append(a)
        target_tiles.append(b)
    tiles = np.concatenate(he_tiles)
    if not len(tiles):
        raise DataError(f"no H&E tissue tile of {tile_size} px at {mpp} um/px in "
                        f"{', '.join(str(p) for p, _ in pairs[:3])}")
    attrs = {"tile_mpp": mpp, "captions": "none"}
    if registration is not None:
        attrs["registration"] = {"kind": registration.kind, "landmarks": registration.n_landmarks,
                                 "residual_after_px": registration.residual_after,
                                 "residual_leave_one_out_px": registration.residual_loo}
    return write_patch_store(out, tiles, pd.concat(rows, ignore_index=True),
                             targets=np.concatenate(target_tiles)[:, None], target_names=[stain],
                             overwrite=overwrite, attrs=attrs)
