"""Patient-level splits: a patient's tiles are all on one side, never both."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import DataError

#: HER2ST (data README): patient C trains; A and B are held out entirely.
HER2ST_TRAIN = ("C",)
HER2ST_HELDOUT = ("A", "B")


def patient_split(manifest: pd.DataFrame, test_patients: Sequence[str] = (),
                  val_fraction: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices for train / val / test, split by patient.

    `test_patients` are held out by name; of the rest, a seeded `val_fraction` of patients (at
    least one when the fraction is > 0 and two or more patients remain) goes to validation.
    """
    if "patient" not in manifest.columns:
        raise DataError("the manifest has no 'patient' column: cannot split by patient")
    patients = manifest["patient"].astype(str).to_numpy()
    unknown = sorted(set(map(str, test_patients)) - set(patients))
    if unknown:
        raise DataError(f"test patients {unknown} are not in the manifest "
                        f"(patients: {sorted(set(patients))})")
    rest = sorted(set(patients) - set(map(str, test_patients)))
    n_val = 0
    if val_fraction > 0 and len(rest) > 1:
        n_val = min(len(rest) - 1, max(1, round(val_fraction * len(rest))))
    rng = np.random.default_rng(seed)
    val = set(rng.choice(rest, size=n_val, replace=False).tolist()) if n_val else set()
    return {
        "train": np.flatnonzero(np.isin(patients, [p for p in rest if p not in val])),
        "val": np.flatnonzero(np.isin(patients, sorted(val))),
        "test": np.flatnonzero(np.isin(patients, list(map(str, test_patients)))),
    }


def her2st_split(manifest: pd.DataFrame, val_fraction: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """The HER2ST default: A and B (those present) are test; C (and RNA-only D..H) train / val."""
    present = set(manifest["patient"].astype(str))
    return patient_split(manifest, [p for p in HER2ST_HELDOUT if p in present], val_fraction, seed)
