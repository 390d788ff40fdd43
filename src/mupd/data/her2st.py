"""HER2ST -> patch store: spot-centred H&E tiles with their RNA, marker targets and captions.

Marker targets come from the spot's own measured expression (log1p CPM of the marker's gene,
divided by that gene's 99th percentile over the *training* spots and clipped to [0, 1]). The
ground truth has spot resolution (100 um spots on a 200 um pitch), so a tile of 128 um around a
spot carries one value: the map is constant over the tile. The model therefore learns
spot-scale marker intensity, and that is what the evaluation measures.

Captions are derived from real metadata, not written by a pathologist: organ, disease, stain,
and marker levels from training-spot tertiles of ERBB2 (HER2) and PTPRC (immune cells).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError
from .sections import load_section
from ..paths import STAIN_CATALOGUE
from .store import write_patch_store
from .tissue import is_tissue

#: The 785-gene HER2ST benchmark panel (HisToGene / Hist2ST) inside ../shared/data.
PANEL_FILE = "st/her2st/Hist2ST_her_hvg_cut_1000.npy"


def marker_genes() -> dict[str, str]:
    """Catalogue marker name -> gene symbol."""
    entries = json.loads(Path(STAIN_CATALOGUE).read_text())["targets"]
    return {e["name"]: e["gene"] for e in entries if e["kind"] == "marker" and e.get("gene")}


def level_word(value: float, cuts: tuple[float, float]) -> str:
    return "low" if value <= cuts[0] else ("high" if value > cuts[1] else "intermediate")


def caption(her2: str, immune: str) -> str:
    immune_text = {"high": "immune-rich", "intermediate": "moderate immune infiltrate",
                   "low": "immune-poor"}[immune]
    return f"H&E, breast, HER2-positive carcinoma, HER2-{her2}, {immune_text}"


def build_her2st_store(data_root: Path, out: Path, sections: Sequence[str], tile_size: int = 128,
                       mpp: float = 1.0, reference: Optional[dict] = None,
                       max_spots: Optional[int] = None, seed: int = 0,
                       overwrite: bool = False) -> tuple[Path, dict]:
    """Build a store; `reference` (scales and tertile cuts) must come from training sections.

    Returns the store path and the reference actually used (fitted here when not given).
    """
    data_root = Path(data_root)
    panel = [str(g) for g in np.load(data_root / PANEL_FILE, allow_pickle=False)]
    markers = marker_genes()
    tiles, rows, rna, marker_values = [], [], [], []
    rng = np.random.default_rng(seed)
    for name in sections:
        section = load_section(data_root, name)
        ids = list(section.spots.index)
        if max_spots is not None and len(ids) > max_spots:
            ids = [ids[i] for i in sorted(rng.choice(len(ids), max_spots, replace=False))]
        section_tiles = section.tiles(ids, tile_size, mpp)
        keep = np.array([is_tissue(t) for t in section_tiles])
        ids = [i for i, k in zip(ids, keep) if k]
        if not ids:
            raise DataError(f"section {name}: no spot tile passed the tissue test")
        absent = set(section.absent_genes(panel))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # absent genes are reported below, once
            expr = section.log_cpm(panel).loc[ids].to_numpy(np.float32)
            mexpr = section.log_cpm(list(markers.values())).loc[ids].to_numpy(np.float32)
        if absent:
            expr[:, [panel.index(g) for g in absent]] = np.nan  # not measured: masked, not zero
            print(f"section {name}: {len(absent)} panel genes have no counts column; masked")
        tiles.append(section_tiles[keep])
        rna.append(expr)
        marker_values.append(mexpr)
        for spot in ids:
            x, y = section.spots.loc[spot, ["image_x", "image_y"]]
            rows.append({"patient": section.patient, "slide": name, "x": float(x), "y": float(y),
                         "mpp": section.mpp, "tile_size": tile_size, "source": "her2st-spot",
                         "spot": spot})
    tiles_all = np.concatenate(tiles)
    values = np.concatenate(marker_values)
    names = list(markers)
    if reference is None:
        reference = {
            "scales": {m: float(max(np.percentile(values[:, i], 99), 1e-6)) for i, m in enumerate(names)},
            "her2_cuts": [float(q) for q in np.percentile(values[:, names.index("HER2")], [33.3, 66.7])],
            "immune_cuts": [float(q) for q in np.percentile(values[:, names.index("CD45")], [33.3, 66.7])],
            "fitted_on": list(sections),
        }
    maps = {}
    T = tile_size
    for i, m in enumerate(names):
        level = np.clip(values[:, i] / reference["scales"][m], 0, 1)
        maps[m] = np.broadcast_to(level[:, None, None], (len(level), T, T)).astype(np.float16)
    manifest = pd.DataFrame(rows)
    manifest["caption"] = [
        caption(level_word(v[names.index("HER2")], tuple(reference["her2_cuts"])),
                level_word(v[names.index("CD45")], tuple(reference["immune_cuts"])))
        for v in values]
    path = write_patch_store(out, tiles_all, manifest, markers=maps,
                             marker_scales=reference["scales"], rna=np.concatenate(rna),
                             genes=panel, rna_normalized=True, overwrite=overwrite,
                             attrs={"reference": reference, "tile_mpp": mpp,
                                    "sections": list(sections)})
    return path, reference
