"""What the patient-C probes (`probe_area_targets.py`, `probe_context.py`) share: the sections
they may read (patient C only; patients A and B are held out and never read), the catalogue's
marker genes, and each spot's depth and raw marker counts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
MARKERS = [(t["name"], t["gene"]) for t in json.loads((ROOT / "src/mupd/resources/stains.json").read_text())
           ["targets"] if t.get("kind") == "marker"]
GENES = [g for _, g in MARKERS]


def tissue_spots(section: str, tile: int = 128, mpp: float = 1.0):
    """(the section's spot table, the sub-table of its tissue spots, their tiles): spots whose
    `tile` px tile at `mpp` um/px passes the project's tissue test."""
    from mupd.data.spatial import her2st_spots, spot_tiles
    from mupd.data.tissue import is_tissue

    table = her2st_spots(DATA, section)
    tiles = spot_tiles(table, tile, mpp, list(table.obs_names))
    keep = np.array([is_tissue(t) for t in tiles])
    return table, table[keep], tiles[keep]


def depth_and_counts(table, section: str) -> tuple[np.ndarray, np.ndarray]:
    """(spots,) UMI depth and (spots, genes) raw counts of `GENES` (0, with a warning, where the
    section lacks a gene)."""
    X = table.X.tocsr()
    depth = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    index = {g.upper(): i for i, g in reversed(list(enumerate(table.var_names)))}
    counts = np.zeros((table.n_obs, len(GENES)))
    for j, gene in enumerate(GENES):
        if gene.upper() in index:
            counts[:, j] = X[:, index[gene.upper()]].toarray().ravel()
        else:
            warnings.warn(f"{section}: {gene} absent -> 0 counts")
    return depth, counts
