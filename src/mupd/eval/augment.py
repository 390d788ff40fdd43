"""Task 4, synthetic augmentation: a few-shot classifier with and without MuPD tiles.

Classes are marker-level (HER2ST region labels exist only for sections without H&E in the
training patient): a spot is "high" when its gene lies in its section's top third and "low"
in the bottom third (middle third left out, section-wise so sequencing depth does not decide).
Per seed: `shots` real training tiles per class train a logistic classifier on handcrafted
features; the augmented run adds `synthetic` tiles per class generated from the RNA of other
training spots of that class. Balanced accuracy on held-out spots; an all-training-tiles
classifier is reported as the reference of what more real data buys.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .baselines import fit_logistic
from .features import features
from .metrics import mean_std
from .spots import SpotTable


def tertile_classes(table: SpotTable, gene: str) -> np.ndarray:
    """1 top third, 0 bottom third, -1 middle, per section."""
    values = table.expression[gene].to_numpy()
    labels = np.full(len(table), -1)
    for name in dict.fromkeys(table.section_of):
        idx = table.section_index(name)
        lo, hi = np.quantile(values[idx], (1 / 3, 2 / 3))
        labels[idx[values[idx] > hi]] = 1
        labels[idx[values[idx] <= lo]] = 0
        if lo == hi:  # ties at zero (shallow sections): the zeros are "low", anything above "high"
            labels[idx[values[idx] > lo]] = 1
    return labels


def evaluate_augmentation(pipeline: Any, train: SpotTable, heldout: SpotTable, marker: str,
                          gene: str, seeds: Sequence[int], shots: int = 8, synthetic: int = 16,
                          steps: int = 20, progress: ProgressCallback = no_progress,
                          cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    y_train, y_held = tertile_classes(train, gene), tertile_classes(heldout, gene)
    test = y_held >= 0
    X_test, y_test = heldout.features[test], y_held[test]
    pool = {c: np.flatnonzero(y_train == c) for c in (0, 1)}
    if min(len(v) for v in pool.values()) < shots + 1:
        raise ValueError(f"{gene}: too few training spots per class for {shots} shots")
    runs: dict[str, list[float]] = {"real few-shot": []}
    examples: dict[str, np.ndarray] = {}
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        picked = {c: rng.choice(pool[c], size=shots, replace=False) for c in (0, 1)}
        X = np.concatenate([train.features[picked[c]] for c in (0, 1)])
        y = np.repeat([0, 1], shots)
        runs["real few-shot"].append(balanced_accuracy_score(y_test, fit_logistic(X, y).predict(X_test)))
        if pipeline is None:
            continue
        X_syn, y_syn = [], []
        for c in (0, 1):
            donors = rng.choice(np.setdiff1d(pool[c], picked[c]), size=synthetic, replace=False)
            tiles = []
            for i, profile in enumerate(train.profiles(donors)):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                tiles.append(pipeline.generate(rna=profile, stain="H&E", num_images=1, steps=steps,
                                               seed=seed * 100_003 + 50_000 + c * 1000 + i)[0])
            tiles = np.stack(tiles)
            examples.setdefault(f"synthetic {marker}-{'high' if c else 'low'}", tiles[:4])
            X_syn.append(features(tiles, train.mpp))
            y_syn += [c] * synthetic
        model = fit_logistic(np.concatenate([X, *X_syn]), np.concatenate([y, y_syn]))
        runs.setdefault("real few-shot + MuPD synthetic", []).append(
            balanced_accuracy_score(y_test, model.predict(X_test)))
        progress(ProgressEvent("augmentation", k + 1, len(seeds), f"seed {seed}"))
    labelled = y_train >= 0
    full = fit_logistic(train.features[labelled], y_train[labelled], list(train.section_of[labelled]))
    return {
        "marker": marker, "gene": gene, "shots_per_class": shots, "synthetic_per_class": synthetic,
        "n_test": int(test.sum()), "seeds": list(seeds), "chance": 0.5,
        "balanced_accuracy": {k: mean_std(v).to_dict() for k, v in runs.items()},
        "all_training_tiles": float(balanced_accuracy_score(y_test, full.predict(X_test))),
        "n_all_training_tiles": int(labelled.sum()), "_examples": examples,
    }
