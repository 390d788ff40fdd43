"""Training samples from a PatchStore (the data package's zarr store of tiles + conditions).

Patients are filtered through the manifest before any tile is read, so held-out patients never
reach training. Samples are read lazily, one tile at a time, so a store larger than memory works
with data-loader workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .batches import Sample
from .config import DataSection, TrainConfig


class StoreSamples(Sequence[Sample]):
    """One Sample per (tile, target) pair of the selected rows of a PatchStore: a marker map
    (float, from spot RNA) or a paired stain tile (RGB uint8, pixel-aligned with the H&E)."""

    def __init__(self, store: Any, rows: np.ndarray, data: DataSection) -> None:
        self.store, self.rows, self.data = store, rows, data
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

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        row_index, target_index = divmod(i, len(self.targets)) if self.data.task == "translate" \
            else (i, 0)
        row = int(self.rows[row_index])
        tile = np.asarray(self.store.tiles[row])
        sample = Sample(target=tile, stain="H&E", name=f"{self.data.store}#{row}")
        if self.data.task == "translate":
            stain = self.targets[target_index]
            target = (np.asarray(self.store.targets[stain][row]) if stain in self.paired
                      else np.asarray(self.store.markers[stain][row], dtype=np.float32))
            sample = Sample(target=target, stain=stain, source=tile, name=sample.name)
        if "text" in self.data.conditions:
            sample.text = self.store.captions[row] or None
        if "rna" in self.data.conditions:
            values = np.asarray(self.store.rna[row], dtype=np.float32)
            if np.isfinite(values).any():
                sample.rna = dict(zip(self.store.genes, values.tolist()))
                sample.rna_normalized = bool(getattr(self.store, "rna_normalized", False))
        return sample


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
        samples: Sequence[Sample] = StoreSamples(store, rows, data)
    else:
        generate = dataclasses.replace(data, task="generate", targets=["H&E"])
        translate = dataclasses.replace(data, task="translate", conditions=[],
                                        targets=[t for t in data.targets if t != "H&E"])
        # Balanced: each tile is seen as often for generation as for translation (all markers).
        gen, trans = StoreSamples(store, rows, generate), StoreSamples(store, rows, translate)
        samples = MixedSamples([gen] * len(translate.targets) + [trans])
    extra = [generation_samples(path, data) for path in data.generate_stores]
    shapes = {data.store: tuple(store.tiles.shape[1:3]),
              **{p: tuple(part.store.tiles.shape[1:3]) for p, (part, _) in zip(data.generate_stores, extra)}}
    if len(set(shapes.values())) > 1:
        raise DataError(f"patch stores have different tile sizes: {shapes}; train on stores of "
                        f"one tile size")
    if extra:
        samples = MixedSamples([samples] + [part for part, _ in extra])
        description += " H&E generation tiles added from " + "; ".join(line for _, line in extra) + "."
        patients = sorted(set(patients) | {p for part, _ in extra
                                           for p in np.asarray(part.store.manifest["patient"])[part.rows]})
    split = (f"patients {', '.join(patients)}"
             + (f"; held out: {', '.join(data.exclude_patients)}" if data.exclude_patients else ""))
    return samples, description, split


def generation_samples(path: str, data: DataSection) -> tuple[StoreSamples, str]:
    """The H&E tiles of one more store as generation samples (its captions as text when the
    config conditions on text and the store has them; else unconditional)."""
    from ..data.store import PatchStore

    store = PatchStore(path)
    text = "text" in data.conditions and getattr(store, "captions", None) is not None
    part = DataSection(store=str(path), task="generate", targets=["H&E"],
                       conditions=["text"] if text else [],
                       exclude_patients=list(data.exclude_patients))
    rows = select_rows(store.manifest["patient"], part)
    return StoreSamples(store, rows, part), (f"`{path}` ({len(rows)} tiles, "
                                             f"{'captioned' if text else 'unconditional'})")


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
