"""Patch store: tiles + marker maps + paired stain tiles + RNA + captions in zarr shards, with a
manifest.

Layout of a store folder::

    store.json        what every shard holds (tile shape, genes, markers, scales) and the shard list
    manifest.csv      all records: patient, slide, x, y (level-0 px), mpp, tile_size, source, ...
    shards/000000/    one zarr group per shard of up to SHARD_RECORDS records, with its manifest

Inside a shard each array is one zarr shard file chunked per record (per record and marker for
the maps), so a training loader reads one tile without decoding its neighbours. A shard is
written to a temporary folder and renamed into place, then `store.json` is replaced: a store
only ever lists complete shards, so a crash mid-append leaves the previous store readable.
The manifest keeps patient and slide for every record, so splits are made by patient before any
pixel is read, and every tile can be traced back to its slide.

RNA uses NaN for genes that were not measured (masked, not zero); `rna_measured` gives the mask.
Marker maps come with `marker_valid`: True where a spot measured the marker. Paired stain tiles
(`targets`, e.g. IHC from BCI / MIST folders or a registered serial section) are RGB tiles
pixel-aligned with the H&E tile of the same record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import zarr

from ..errors import DataError, OutputExistsError
from ..io.atomic import atomic_output, atomic_write_text

MANIFEST_COLUMNS = ("patient", "slide", "x", "y", "mpp", "tile_size", "source")
#: Records per shard folder.
SHARD_RECORDS = 256
FORMAT = "mupd-patch-store"


class RecordArray:
    """Records of all shards as one array (read side): `a[i]`, `a[i:j]`, `a[[i, k]]`, `a[:]`,
    and `a[rows, ...]` (the records are read, the rest indexes them as numpy does).

    With `channel`, it is the view of one marker of an (N, M, H, W) array, read alone.
    """

    def __init__(self, parts: Sequence[zarr.Array], channel: Optional[int] = None) -> None:
        self.parts, self.channel = list(parts), channel
        self.offsets = np.cumsum([0] + [p.shape[0] for p in self.parts])
        first = self.parts[0]
        inner = first.shape[1:] if channel is None else first.shape[2:]
        self.shape = (int(self.offsets[-1]), *inner)
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, part: int, local) -> np.ndarray:
        array = self.parts[part]
        if self.channel is None:
            return np.asarray(array.oindex[local] if isinstance(local, np.ndarray) else array[local])
        return np.asarray(array.oindex[local, self.channel] if isinstance(local, np.ndarray)
                          else array[local, self.channel])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # records first, then numpy indexing of what was read
            rows, rest = (key[0] if key else slice(None)), key[1:]
            out = self[rows]
            return out[rest] if isinstance(rows, (int, np.integer)) else out[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"record {key} out of range for {len(self)} records")
            part = int(np.searchsorted(self.offsets, row, side="right") - 1)
            return self._read(part, row - int(self.offsets[part]))
        rows = np.arange(len(self))[key]
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        parts = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(parts):
            where = np.flatnonzero(parts == part)
            out[where] = self._read(int(part), rows[where] - int(self.offsets[part]))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class PatchStore:
    """Read side: numpy arrays indexed by record (global row), no torch.

    `tiles` (N, H, W, 3) uint8; `markers[name]` (N, H, W) float16 and `marker_valid[name]`
    (N, H, W) bool; `targets[stain]` (N, H, W, 3) uint8 paired stain tiles; `rna` (N, G)
    float32 with NaN = not measured; `captions` (N) or None;
    `manifest` one row per record.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        info_path = self.path / "store.json"
        if not info_path.exists():
            old = " (it is a first-format store: rebuild it with `mupd data`)" \
                if (self.path / "zarr.json").exists() else ""
            raise DataError(f"{self.path} is not a patch store (no store.json){old}")
        self.info: dict = json.loads(info_path.read_text())
        if self.info.get("format") != FORMAT:
            raise DataError(f"{info_path} is not a {FORMAT} description")
        shards = [self.path / "shards" / s for s in self.info["shards"]]
        if not shards:
            raise DataError(f"patch store {self.path} has no records")
        groups = [zarr.open_group(s, mode="r") for s in shards]
        self.manifest = pd.concat(
            [pd.read_csv(s / "manifest.csv", dtype={"patient": str, "slide": str}) for s in shards],
            ignore_index=True)
        self.tiles = RecordArray([g["tiles"] for g in groups])
        self.genes: list[str] = list(self.info.get("genes", []))
        self.rna_normalized: bool = bool(self.info.get("rna_normalized", True))
        self.rna = RecordArray([g["rna"] for g in groups]) if self.genes else None
        names = list(self.info.get("markers", []))
        self.markers = {m: RecordArray([g["markers"] for g in groups], i) for i, m in enumerate(names)}
        self.marker_valid = {m: RecordArray([g["marker_valid"] for g in groups], i)
                             for i, m in enumerate(names)}
        self.marker_scales: dict[str, float] = dict(self.info.get("marker_scales", {}))
        self.targets = {t: RecordArray([g["targets"] for g in groups], i)
                        for i, t in enumerate(self.info.get("targets", []))}
        self.attrs: dict = dict(self.info.get("attrs", {}))
        self.captions: Optional[list[str]] = (
            self.manifest["caption"].fillna("").tolist() if "caption" in self.manifest else None)
        if len(self.manifest) != len(self.tiles):
            raise DataError(f"{self.path}: manifest has {len(self.manifest)} rows but "
                            f"{len(self.tiles)} tiles")

    def __len__(self) -> int:
        return len(self.tiles)

    def rows_of(self, patients: Sequence[str]) -> np.ndarray:
        return np.flatnonzero(self.manifest["patient"].isin([str(p) for p in patients]).to_numpy())

    def rna_measured(self, rows: Any = slice(None)) -> np.ndarray:
        """Boolean mask of measured genes for `rows` (False where RNA is NaN)."""
        if self.rna is None:
            raise DataError(f"patch store {self.path} holds no RNA")
        return np.isfinite(self.rna[rows])

    def records(self, rows: Sequence[int]) -> dict[str, Any]:
        """Everything of the given rows (e.g. a split's `train`) as numpy arrays."""
        rows = np.asarray(rows, dtype=int)
        out: dict[str, Any] = {"manifest": self.manifest.iloc[rows].reset_index(drop=True),
                               "tiles": self.tiles[rows]}
        if self.markers:
            out["markers"] = np.stack([self.markers[m][rows] for m in self.markers], axis=1)
            out["marker_valid"] = np.stack([self.marker_valid[m][rows] for m in self.markers], axis=1)
        if self.targets:
            out["targets"] = np.stack([self.targets[t][rows] for t in self.targets], axis=1)
        if self.rna is not None:
            out["rna"] = self.rna[rows]
        if self.captions is not None:
            out["captions"] = [self.captions[i] for i in rows]
        return out


def _check_records(tiles: np.ndarray, manifest: pd.DataFrame, markers: Optional[np.ndarray],
                   marker_valid: Optional[np.ndarray], rna: Optional[np.ndarray],
                   targets: Optional[np.ndarray], info: dict) -> None:
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise DataError(f"tiles must be (N, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}")
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing or len(manifest) != len(tiles):
        raise DataError(f"manifest needs columns {MANIFEST_COLUMNS} (missing {missing}) and one "
                        f"row per tile ({len(manifest)} rows for {len(tiles)} tiles)")
    n, h, w = tiles.shape[:3]
    if list(info["tile_shape"]) != [h, w]:
        raise DataError(f"tiles are {h}x{w} but the store holds {info['tile_shape']} tiles")
    m = len(info["markers"])
    if (markers is None) != (m == 0) or (markers is not None and markers.shape != (n, m, h, w)):
        raise DataError(f"marker maps must be (N, {m}, {h}, {w}) for markers {info['markers']}, "
                        f"got {None if markers is None else markers.shape}")
    if markers is not None and (marker_valid is None or marker_valid.shape != markers.shape):
        raise DataError("marker maps need a marker_valid mask of the same shape")
    names = info.get("targets", [])
    if (targets is None) != (not names) or (targets is not None and (
            targets.shape != (n, len(names), h, w, 3) or targets.dtype != np.uint8)):
        raise DataError(f"paired stain tiles must be (N, {len(names)}, {h}, {w}, 3) uint8 for "
                        f"stains {names}, got {None if targets is None else targets.shape}")
    g = len(info["genes"])
    if (rna is None) != (g == 0) or (rna is not None and rna.shape != (n, g)):
        raise DataError(f"rna must be (N tiles, {g} genes) with a gene list, "
                        f"got {None if rna is None else rna.shape}")


def _write_shard(folder: Path, tiles: np.ndarray, manifest: pd.DataFrame,
                 markers: Optional[np.ndarray], marker_valid: Optional[np.ndarray],
                 rna: Optional[np.ndarray], targets: Optional[np.ndarray]) -> None:
    group = zarr.open_group(folder, mode="w")
    n = len(tiles)

    def put(name: str, data: np.ndarray, chunk: tuple[int, ...]) -> None:
        group.create_array(name, data=data, chunks=chunk, shards=(n, *data.shape[1:]))

    put("tiles", tiles, (1, *tiles.shape[1:]))
    if markers is not None:
        put("markers", markers.astype(np.float16), (1, 1, *markers.shape[2:]))
        put("marker_valid", marker_valid.astype(bool), (1, 1, *markers.shape[2:]))
    if targets is not None:
        put("targets", targets, (1, 1, *targets.shape[2:]))
    if rna is not None:
        put("rna", rna.astype(np.float32), (1, rna.shape[1]))
    manifest.to_csv(folder / "manifest.csv", index=False)


def _stack(arrays, names: Sequence[str]) -> Optional[np.ndarray]:
    """(N, K, ...) from a name -> (N, ...) dict in `names` order, or the array as given."""
    if arrays is None:
        return None
    if isinstance(arrays, Mapping):
        return np.stack([np.asarray(arrays[m]) for m in names], axis=1)
    return np.asarray(arrays)


def append_patch_store(path: str | Path, tiles: np.ndarray, manifest: pd.DataFrame,
                       markers: Optional[np.ndarray | Mapping[str, np.ndarray]] = None,
                       marker_valid: Optional[np.ndarray | Mapping[str, np.ndarray]] = None,
                       rna: Optional[np.ndarray] = None,
                       targets: Optional[np.ndarray | Mapping[str, np.ndarray]] = None) -> Path:
    """Add records to an existing store, one complete shard at a time.

    `markers` are (N, M, H, W) in the store's marker order (or a name -> (N, H, W) dict);
    `marker_valid` defaults to all True (maps measured everywhere); `targets` are paired stain
    tiles (N, S, H, W, 3) uint8, pixel-aligned with `tiles`, in the store's target order.
    """
    path = Path(path)
    info_path = path / "store.json"
    if not info_path.exists():
        raise DataError(f"{path} is not a patch store (no store.json); create it first")
    info = json.loads(info_path.read_text())
    tiles = np.asarray(tiles)
    stack = _stack(markers, info["markers"])
    valid = _stack(marker_valid, info["markers"])
    targets = _stack(targets, info.get("targets", []))
    if stack is not None and valid is None:
        valid = np.ones(stack.shape, dtype=bool)
    rna = None if rna is None else np.asarray(rna, dtype=np.float32)
    manifest = manifest.reset_index(drop=True)
    _check_records(tiles, manifest, stack, valid, rna, targets, info)
    (path / "shards").mkdir(exist_ok=True)
    for start in range(0, len(tiles), SHARD_RECORDS):
        part = slice(start, start + SHARD_RECORDS)
        name = f"{len(info['shards']):06d}"
        # a folder of that name is a crash's, renamed but never listed: replaced
        with atomic_output(path / "shards" / name, overwrite=True) as tmp:
            _write_shard(tmp, tiles[part], manifest.iloc[part],
                         *(None if a is None else a[part] for a in (stack, valid, rna, targets)))
        info["shards"].append(name)
        atomic_write_text(info_path, json.dumps(info, indent=1), fsync=False)
    all_rows = pd.concat([pd.read_csv(path / "shards" / s / "manifest.csv", dtype=str)
                          for s in info["shards"]], ignore_index=True)
    atomic_write_text(path / "manifest.csv", all_rows.to_csv(index=False), fsync=False)
    return path


def write_patch_store(
    path: str | Path,
    tiles: np.ndarray,
    manifest: pd.DataFrame,
    markers: Optional[np.ndarray | Mapping[str, np.ndarray]] = None,
    marker_scales: Optional[dict[str, float]] = None,
    rna: Optional[np.ndarray] = None,
    genes: Optional[Sequence[str]] = None,
    rna_normalized: bool = True,
    overwrite: bool = False,
    attrs: Optional[dict] = None,
    marker_names: Optional[Sequence[str]] = None,
    marker_valid: Optional[np.ndarray | Mapping[str, np.ndarray]] = None,
    targets: Optional[np.ndarray | Mapping[str, np.ndarray]] = None,
    target_names: Optional[Sequence[str]] = None,
) -> Path:
    """Create a store with its first records (built aside, renamed into place when complete).

    `markers` is a name -> (N, H, W) dict, or (N, M, H, W) with `marker_names`; `targets`
    (paired stain tiles) a stain -> (N, H, W, 3) dict, or (N, S, H, W, 3) with `target_names`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"patch store {path} already exists; pass overwrite to replace it")
    tiles = np.asarray(tiles)
    names = list(markers) if isinstance(markers, Mapping) else list(marker_names or [])
    if markers is not None and not isinstance(markers, Mapping) and len(names) != np.shape(markers)[1]:
        raise DataError(f"marker maps {np.shape(markers)} need one name per map, got {names}")
    if rna is not None and genes is None:
        raise DataError(f"rna must be (N tiles, N genes) with a gene list, got no genes for {np.shape(rna)}")
    info = {"format": FORMAT, "version": 2, "tile_shape": list(tiles.shape[1:3]) if tiles.ndim == 4 else [],
            "genes": [str(g) for g in genes or []], "rna_normalized": bool(rna_normalized),
            "markers": names, "marker_scales": dict(marker_scales or {}), "attrs": dict(attrs or {}),
            "targets": list(targets) if isinstance(targets, Mapping) else list(target_names or []),
            "shards": []}
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        (tmp / "store.json").write_text(json.dumps(info, indent=1))
        append_patch_store(tmp, tiles, manifest, markers=markers, marker_valid=marker_valid, rna=rna,
                           targets=targets)
    return path


def describe(store: PatchStore) -> str:
    counts = store.manifest.groupby("patient").size().to_dict()
    return json.dumps({"records": len(store), "per_patient": counts, "markers": list(store.markers),
                       "paired_stains": list(store.targets),
                       "genes": len(store.genes), "shards": len(store.info["shards"])})
