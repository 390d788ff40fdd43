"""Patch store: tiles + marker maps + RNA + captions in one zarr group, with a manifest.

The manifest (CSV beside the arrays) keeps patient, slide, level-0 coordinates and mpp for every
record, so splits are made by patient before any pixel is read and every training tile can be
traced back to its slide. A store is built in a temporary folder and renamed into place when
complete: a crash never leaves a half store under the final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import zarr

from ..errors import DataError, OutputExistsError

MANIFEST_COLUMNS = ("patient", "slide", "x", "y", "mpp", "tile_size", "source")
#: Records per zarr chunk along the first axis.
CHUNK_RECORDS = 32


class PatchStore:
    """Read side: numpy arrays indexed by record; no torch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.csv").exists() or not (self.path / "zarr.json").exists():
            raise DataError(f"{self.path} is not a patch store (no manifest.csv / zarr.json)")
        self.group = zarr.open_group(self.path, mode="r")
        self.manifest = pd.read_csv(self.path / "manifest.csv", dtype={"patient": str, "slide": str})
        self.tiles = self.group["tiles"]
        info = dict(self.group.attrs)
        self.genes: list[str] = list(info.get("genes", []))
        self.rna_normalized: bool = bool(info.get("rna_normalized", True))
        self.rna = self.group["rna"] if "rna" in self.group else None
        names = info.get("markers", [])
        self.markers = {m: self.group[f"markers/{m}"] for m in names} if names else {}
        self.marker_scales: dict[str, float] = dict(info.get("marker_scales", {}))
        self.captions: Optional[list[str]] = (
            self.manifest["caption"].fillna("").tolist() if "caption" in self.manifest else None)
        if len(self.manifest) != self.tiles.shape[0]:
            raise DataError(f"{self.path}: manifest has {len(self.manifest)} rows but "
                            f"{self.tiles.shape[0]} tiles")

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    def rows_of(self, patients: Sequence[str]) -> np.ndarray:
        return np.flatnonzero(self.manifest["patient"].isin([str(p) for p in patients]).to_numpy())


def write_patch_store(
    path: str | Path,
    tiles: np.ndarray,
    manifest: pd.DataFrame,
    markers: Optional[dict[str, np.ndarray]] = None,
    marker_scales: Optional[dict[str, float]] = None,
    rna: Optional[np.ndarray] = None,
    genes: Optional[Sequence[str]] = None,
    rna_normalized: bool = True,
    overwrite: bool = False,
    attrs: Optional[dict] = None,
) -> Path:
    """Write a complete store atomically. `rna` uses NaN for genes that were not measured."""
    path = Path(path)
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise DataError(f"tiles must be (N, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}")
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing or len(manifest) != len(tiles):
        raise DataError(f"manifest needs columns {MANIFEST_COLUMNS} (missing {missing}) and one "
                        f"row per tile ({len(manifest)} rows for {len(tiles)} tiles)")
    if rna is not None and (genes is None or np.shape(rna) != (len(tiles), len(genes))):
        raise DataError(f"rna must be (N tiles, N genes) with a gene list, got {np.shape(rna)}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"patch store {path} already exists; pass overwrite to replace it")
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(tmp, mode="w")
        n, h, w, _ = tiles.shape
        group.create_array("tiles", data=tiles, chunks=(CHUNK_RECORDS, h, w, 3))
        for name, maps in (markers or {}).items():
            group.create_array(f"markers/{name}", data=np.asarray(maps, dtype=np.float16),
                               chunks=(CHUNK_RECORDS, h, w))
        if rna is not None:
            group.create_array("rna", data=np.asarray(rna, dtype=np.float32),
                               chunks=(CHUNK_RECORDS, len(genes)))
        group.attrs.update({
            "genes": list(genes or []), "rna_normalized": rna_normalized,
            "markers": list(markers or {}), "marker_scales": dict(marker_scales or {}),
            **(attrs or {}),
        })
        manifest.to_csv(tmp / "manifest.csv", index=False)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def describe(store: PatchStore) -> str:
    counts = store.manifest.groupby("patient").size().to_dict()
    return json.dumps({"records": len(store), "per_patient": counts, "markers": list(store.markers),
                       "genes": len(store.genes)})
