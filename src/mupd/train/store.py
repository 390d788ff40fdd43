"""Training samples from a PatchStore (the data package's zarr store of tiles + conditions).

Patients are filtered through the manifest before any tile is read, so held-out patients never
reach training. Samples are read lazily, one tile at a time, so a store larger than memory works
with data-loader workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DataError
from .batches import Sample
from .config import DataSection, TrainConfig


class StoreSamples(Sequence[Sample]):
    """One Sample per (tile, target) pair of the selected rows of a PatchStore: a marker map
    (float, from spot RNA) or a paired stain tile (RGB uint8, pixel-aligned with the H&E)."""

    def __init__(self, store: Any, rows: np.ndarray, data: DataSection,
                 genes: Sequence[str] = ()) -> None:
        """`genes`: the model's gene readout panel; translation samples then carry their spot's
        RNA over it (the store's gene list must be that panel)."""
        self.store, self.rows, self.data = store, rows, data
        self.genes = bool(genes) and data.task == "translate"
        if self.genes and list(getattr(store, "genes", None) or []) != list(genes):
            raise DataError(f"patch store {data.store} holds RNA over {len(getattr(store, 'genes', None) or [])} "
                            f"genes, not the model's gene readout panel of {len(genes)}: train the "
                            f"readout on the store it was fitted on")
        self.targets = list(data.targets)
        # a target is a marker map (from spot RNA) or a paired stain tile (BCI / MIST, registered)
        self.paired = set(getattr(store, "targets", {}) or {})
        if data.task == "translate":
            known = set(getattr(store, "markers", {}) or {}) | self.paired
            missing = [t for t in self.targets if t not in known]
            if missing:
                raise DataError(f"patch store {data.store} has no marker maps or paired stain tiles "
                                f"for {missing} (it has {sorted(known) or 'none'})")
        if "rna" in data.conditions and getattr(store, "rna", None) is None:
            raise DataError(f"data.conditions asks for rna but patch store {data.store} holds none")
        if "text" in data.conditions and getattr(store, "captions", None) is None:
            raise DataError(f"data.conditions asks for text but patch store {data.store} has no captions")

    def __len__(self) -> int:
        return len(self.rows) * (len(self.targets) if self.data.task == "translate" else 1)

    def patients(self) -> set[str]:
        return {str(p) for p in np.asarray(self.store.manifest["patient"])[self.rows]}

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        row_index, target_index = divmod(i, len(self.targets)) if self.data.task == "translate" \
            else (i, 0)
        row = int(self.rows[row_index])
        tile = np.asarray(self.store.tiles[row])
        sample = Sample(target=tile, stain="H&E", name=f"{self.data.store}#{row}")
        if self.data.task == "translate":
            stain = self.targets[target_index]
            sample = Sample(target=None, stain=stain, source=tile, name=sample.name)
            if stain in self.paired:
                sample.target = np.asarray(self.store.targets[stain][row])
            else:  # a marker map counts only where a spot measured it
                sample.target = np.asarray(self.store.markers[stain][row], dtype=np.float32)
                sample.target_valid = np.asarray(self.store.marker_valid[stain][row], dtype=bool)
            if self.genes:
                sample.genes = np.asarray(self.store.rna[row], dtype=np.float32)
        if "text" in self.data.conditions:
            sample.text = self.store.captions[row] or None
        if "rna" in self.data.conditions:
            values = np.asarray(self.store.rna[row], dtype=np.float32)
            measured = np.isfinite(values)
            if measured.any():  # a gene the section did not measure is absent, not NaN
                sample.rna = {g: float(v) for g, v, ok in zip(self.store.genes, values, measured) if ok}
                sample.rna_normalized = bool(getattr(self.store, "rna_normalized", False))
        return sample


def fit_gene_readout(data: DataSection, weight: Optional[float] = None) -> dict[str, Any]:
    """The gene readout spec (`models.readout.GeneReadout`) from the training rows of
    `data.store`: its gene panel, their mean and std over those spots, its marker scales."""
    from ..data.markers import marker_genes
    from ..data.store import PatchStore
    from ..models.readout import GeneReadout

    store = PatchStore(data.store)
    if getattr(store, "rna", None) is None or not store.genes:
        raise DataError(f"model.overrides.gene_readout needs spot RNA, but patch store {data.store} "
                        f"holds none")
    rows = select_rows(store.manifest["patient"], data)
    values = np.stack([np.asarray(store.rna[int(r)], dtype=np.float32) for r in rows])
    return GeneReadout.fit(store.genes, values, store.marker_scales, marker_genes(),
                           *(() if weight is None else (float(weight),))).to_config()


def select_rows(patients: Sequence[str], data: DataSection) -> np.ndarray:
    """Rows whose patient is allowed (in `patients` when given, never in `exclude_patients`)."""
    patients = np.asarray([str(p) for p in patients])
    keep = ~np.isin(patients, data.exclude_patients)
    if data.patients:
        keep &= np.isin(patients, data.patients)
    if not keep.any():
        raise DataError(f"no tile of patch store {data.store} is left after the patient filter "
                        f"(patients in store: {sorted(set(patients.tolist()))})")
    return np.flatnonzero(keep)


def store_samples(config: TrainConfig, pipeline: Any) -> tuple[Sequence[Sample], str, str]:
    from ..data.store import PatchStore

    data = config.data
    store = PatchStore(data.store)
    rows = select_rows(store.manifest["patient"], data)
    patients = sorted({str(p) for p in np.asarray(store.manifest["patient"])[rows]})
    description = (f"Patch store `{data.store}`: {len(rows)} tiles, task {data.task}, "
                   f"conditions {', '.join(data.conditions) or 'none'}.")
    if data.task != "both":
        readout = getattr(pipeline, "gene_readout", None)
        samples: Sequence[Sample] = StoreSamples(store, rows, data, readout.genes if readout else ())
    else:
        generate = dataclasses.replace(data, task="generate", targets=["H&E"])
        translate = dataclasses.replace(data, task="translate", conditions=[],
                                        targets=[t for t in data.targets if t != "H&E"])
        # Balanced: each tile is seen as often for generation as for translation (all markers).
        readout = getattr(pipeline, "gene_readout", None)
        gen = StoreSamples(store, rows, generate)
        trans = StoreSamples(store, rows, translate, readout.genes if readout else ())
        samples = MixedSamples([gen] * len(translate.targets) + [trans])
    extra = [he_tiles(path, data.exclude_patients, text="text" in data.conditions)
             for path in data.generate_stores]
    check_tile_sizes({data.store: store, **{part.data.store: part.store for part in extra}})
    if extra:
        samples = MixedSamples([samples, *extra])
        description += " H&E generation tiles added from " + "; ".join(
            f"`{part.data.store}` ({len(part.rows)} tiles, "
            f"{'captioned' if part.data.conditions else 'unconditional'})" for part in extra) + "."
        patients = sorted(set(patients).union(*(part.patients() for part in extra)))
    split = (f"patients {', '.join(patients)}"
             + (f"; held out: {', '.join(data.exclude_patients)}" if data.exclude_patients else ""))
    return samples, description, split


def he_tiles(path: str, exclude_patients: Sequence[str], patients: Sequence[str] = (),
             text: bool = False) -> StoreSamples:
    """The H&E tiles of one store's allowed patients as generation samples, with the store's
    captions as text when `text` and the store has them (else unconditional)."""
    from ..data.store import PatchStore

    store = PatchStore(path)
    captioned = text and getattr(store, "captions", None) is not None
    part = DataSection(store=str(path), task="generate", targets=["H&E"],
                       conditions=["text"] if captioned else [], patients=list(patients),
                       exclude_patients=list(exclude_patients))
    return StoreSamples(store, select_rows(store.manifest["patient"], part), part)


def check_tile_sizes(stores: dict[str, Any]) -> None:
    """Stores trained together (path -> PatchStore) must share one tile size (a batch is one
    tensor)."""
    shapes = {path: tuple(store.tiles.shape[1:3]) for path, store in stores.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"patch stores have different tile sizes: {shapes}; train on stores of "
                        f"one tile size")


class MixedSamples(Sequence[Sample]):
    """Several sample sets read as one (multi-task training from one store)."""

    def __init__(self, parts: Sequence[Sequence[Sample]]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[part][i - int(self.offsets[part])]
