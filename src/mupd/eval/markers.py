"""Task 1, virtual marker staining: predicted marker intensity against measured spot RNA.

Spot level: per-marker Pearson r over a held-out section's spots between the prediction
(MuPD: the marker map averaged over the 100 um spot footprint) and log1p(CPM) of the marker's
gene. MSE beside it, in log1p(CPM) units; MuPD's [0, 1] intensities are first mapped to that
scale by a per-marker linear fit on training spots (r does not depend on this).

Slide level (our definition; the paper's own is not reproducible here): per held-out section,
the Pearson r across markers between the predicted and the measured deviation of that section
from the training patient. Predicted deviation of marker j: mean prediction over the section's
spots minus mean prediction over training spots; measured: pseudo-bulk log1p(CPM) of the
section minus that of the training spots pooled (robust to per-spot depth); both divided by
the training spots' std of gene j. One r per section, resting on as many points as markers.

Learned baselines: ridge on the handcrafted features, and ridge on ImageNet EfficientNet-Lite0
features (`pretrained.EfficientNetLite0Features`, RIDGE_CNN) fitted the same way (penalty per
marker by GroupKFold over the training sections, patient C only); both enter every table.

Uncertainty: 95% block-bootstrap intervals (whole 600 um blocks of spots resampled) for each
r, for the mean r over markers, and for MuPD minus each baseline in mean r; MuPD's interval is that of
its prediction averaged over seeds.

Block level: the same r over 600 um blocks (3 x 3 array positions): mean prediction of the
block's spots against log1p CPM of the block's pooled counts.

Depth check: a spot's sequencing depth follows its cellularity, which an image shows, and
shallow spots (B4: ~650 UMI) turn detection noise into log-CPM jumps. Each section reports the
r of the measurement with log depth and each method's partial r given log depth, so a
prediction that only tracks cellularity is visible as such.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression

from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .baselines import RidgeBaseline, TrainingMeanBaseline
from .features import FEATURE_NAMES
from ..data.sections import footprint_mask
from .metrics import (block_bootstrap_ci, mean_std, mse_per_column, partial_pearson, pearson,
                      pearson_per_column)
from .spots import SpotTable

#: The untrained cellularity baseline: mean hematoxylin optical density of the tile, the same
#: number for every marker (linearly mapped to each gene on training spots for MSE / slide level).
DENSITY = "hematoxylin density"
#: Spatial bootstrap blocks: 3 x 3 array positions (600 um), beyond most spot-to-spot correlation.
BLOCK_SPOTS = 3
#: The second learned baseline: ridge on ImageNet EfficientNet-Lite0 global-pooled features.
RIDGE_CNN = "ridge (EfficientNet-Lite0)"
PAPER_CONTEXT = {"patch_level_r": 0.238, "slide_level_r": 0.464,
                 "note": "MuPD paper, mIF markers on its own data; context, not like-for-like"}


def predict_marker_spots(pipeline: Any, tiles: np.ndarray, markers: Sequence[str], seed: int,
                         steps: int, batch_size: int = 16,
                         cancel: Optional[CancelToken] = None) -> np.ndarray:
    """(N, M) MuPD marker intensity averaged over each tile's central spot footprint."""
    mask = footprint_mask(tiles.shape[1], float(pipeline.mpp))
    out = np.empty((len(tiles), len(markers)))
    for start in range(0, len(tiles), batch_size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        maps = pipeline.translate(tiles[start:start + batch_size], list(markers), steps=steps,
                                  seed=seed + start, batch_size=batch_size)
        for j, m in enumerate(markers):
            out[start:start + batch_size, j] = np.asarray(maps[m], np.float64)[:, mask].mean(axis=1)
    return out


def _slide_deviation(pred_section: np.ndarray, pred_train: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return (pred_section.mean(axis=0) - pred_train.mean(axis=0)) / sd


def evaluate_markers(train: SpotTable, heldout: SpotTable, markers: dict[str, str],
                     ridge: RidgeBaseline, pipeline: Any = None, seeds: Sequence[int] = (0, 1, 2), steps: int = 1,
                     calibration_spots: int = 200, n_boot: int = 1000,
                     progress: ProgressCallback = no_progress,
                     cancel: Optional[CancelToken] = None,
                     feature_ridges: Optional[dict[str, tuple[RidgeBaseline, np.ndarray, np.ndarray]]] = None,
                     model_tiles: Optional[tuple[np.ndarray, np.ndarray]] = None,
                     ) -> dict[str, Any]:
    """`markers`: marker name -> gene; `ridge` fitted on `train` for those genes (in that order).
    `feature_ridges`: further ridge baselines on other feature spaces, name -> (ridge fitted on
    `train` for those genes, its training features, its held-out features (rows as `heldout`)),
    e.g. {RIDGE_CNN: ...}; each is scored, bootstrapped and compared with MuPD like `ridge`.
    `model_tiles`: (training, held-out) tiles the model reads in place of the tables' own
    (e.g. stain-normalised ones); the baselines always read the tables' tiles.
    Returns JSON-able results plus `_predictions` for the figures."""
    names, genes = list(markers), list(markers.values())
    feature_ridges = dict(feature_ridges or {})
    for key, (_, X_tr, X_held) in feature_ridges.items():
        if len(X_tr) != len(train) or len(X_held) != len(heldout):
            raise ValueError(f"{key}: features for {len(X_tr)} / {len(X_held)} spots, tables have "
                             f"{len(train)} / {len(heldout)}")
    learned = ["ridge", *feature_ridges]
    Y_train = train.expression[genes].to_numpy()
    mean = TrainingMeanBaseline().fit(train.features, Y_train)
    sd = Y_train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    bulk_train = _pooled_pseudobulk(train, genes)

    rng = np.random.default_rng(0)
    cal = np.sort(rng.choice(len(train), size=min(calibration_spots, len(train)), replace=False))
    model_runs: list[dict[str, np.ndarray]] = []
    tiles_train, tiles_held = model_tiles if model_tiles is not None else (train.tiles, heldout.tiles)
    if pipeline is not None:
        total = len(seeds) * (len(cal) + len(heldout))
        done = 0
        for seed in seeds:
            pred_cal = predict_marker_spots(pipeline, tiles_train[cal], names, seed, steps, cancel=cancel)
            done += len(cal)
            progress(ProgressEvent("markers", done, total, f"seed {seed}: training calibration"))
            pred_held = predict_marker_spots(pipeline, tiles_held, names, seed, steps, cancel=cancel)
            done += len(heldout)
            progress(ProgressEvent("markers", done, total, f"seed {seed}: held-out spots"))
            calibrated = np.column_stack([
                LinearRegression().fit(pred_cal[:, [j]], Y_train[cal, j]).predict(pred_held[:, [j]])
                for j in range(len(names))])
            cal_train = np.column_stack([
                LinearRegression().fit(pred_cal[:, [j]], Y_train[cal, j]).predict(pred_cal[:, [j]])
                for j in range(len(names))])
            model_runs.append({"raw": pred_held, "calibrated": calibrated, "train": cal_train})

    h = FEATURE_NAMES.index("hematoxylin_mean")
    density = np.repeat(heldout.features[:, [h]], len(names), axis=1)
    density_train = np.repeat(train.features[:, [h]], len(names), axis=1)
    fits = [LinearRegression().fit(density_train[:, [j]], Y_train[:, j]) for j in range(len(names))]
    density_cal = np.column_stack([f.predict(density[:, [j]]) for j, f in enumerate(fits)])
    density_cal_train = np.column_stack([f.predict(density_train[:, [j]]) for j, f in enumerate(fits)])

    sections: dict[str, Any] = {}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for name in dict.fromkeys(heldout.section_of):
        idx = heldout.section_index(name)
        section = next(s for s in heldout.sections if s.name == name)
        Y = heldout.expression[genes].to_numpy()[idx]
        measured_dev = (section.pseudobulk_log_cpm(genes).to_numpy() - bulk_train) / sd
        ridge_pred, mean_pred = ridge.predict(heldout.features[idx]), mean.predict(heldout.features[idx])
        ridge_train = ridge.predict(train.features)
        learned_pred = {"ridge": ridge_pred}
        methods: dict[str, Any] = {
            "ridge": _one_run(ridge_pred, Y, names, measured_dev,
                              _slide_deviation(ridge_pred, ridge_train, sd))}
        for key, (model, X_tr, X_held) in feature_ridges.items():
            learned_pred[key] = model.predict(X_held[idx])
            methods[key] = _one_run(learned_pred[key], Y, names, measured_dev,
                                    _slide_deviation(learned_pred[key], model.predict(X_tr), sd))
        methods.update({
            "training-mean": _one_run(mean_pred, Y, names, measured_dev, np.zeros(len(names))),
            DENSITY: _one_run(density[idx], Y, names, measured_dev,
                              _slide_deviation(density_cal[idx], density_cal_train, sd),
                              calibrated=density_cal[idx]),
        })
        predictions[name] = {"measured": Y, **learned_pred, DENSITY: density[idx]}
        if model_runs:
            runs = [_one_run(run["raw"][idx], Y, names, measured_dev,
                             _slide_deviation(run["calibrated"][idx], run["train"], sd),
                             calibrated=run["calibrated"][idx]) for run in model_runs]
            methods = {"MuPD": _over_seeds(runs, names), **methods}
        for key in (*learned, DENSITY, "training-mean"):
            methods[key] = _over_seeds([methods[key]], names)
        spot_ids = [heldout.spot_ids[i] for i in idx]
        blocks = _spatial_blocks(section.spots.loc[spot_ids])
        counts = section.counts.loc[spot_ids]
        point = {**learned_pred, DENSITY: density[idx]}
        if model_runs:
            point["MuPD"] = np.mean([run["raw"][idx] for run in model_runs], axis=0)
            predictions[name]["MuPD"] = point["MuPD"]
        depth = np.log1p(counts.sum(axis=1).to_numpy(dtype=float))
        block_measured = _block_log_cpm(counts, genes, blocks)
        for key, P in point.items():
            methods[key].update(_spatial_checks(P, Y, names, blocks, depth, block_measured, n_boot))
        sections[name] = {
            "n_spots": int(len(idx)), "source_mpp": round(section.mpp, 3),
            "n_blocks": int(len(set(blocks))),
            "measured_r_with_log_depth": {m: pearson(Y[:, j], depth) for j, m in enumerate(names)},
            "absent_genes": heldout.absent_genes.get(name, []),
            "slide_level_points": len(names), "methods": methods,
            "mupd_minus_baseline_mean_r_ci95": {
                key: block_bootstrap_ci(
                    lambda s, B=point[key]: _mean_r(point["MuPD"][s], Y[s]) - _mean_r(B[s], Y[s]), blocks, n_boot)
                for key in (*learned, DENSITY)} if model_runs else {},
            "spot_xy": section.spots.loc[spot_ids, ["image_x", "image_y"]].to_numpy().tolist(),
        }
    return {
        "markers": markers, "seeds": list(seeds) if model_runs else [],
        "ridge_alphas": dict(zip(names, ridge.alphas_)),
        "feature_ridge_alphas": {key: dict(zip(names, model.alphas_))
                                 for key, (model, _, _) in feature_ridges.items()},
        "learned_baselines": learned, "n_train_spots": len(train),
        "train_sections": sorted(set(train.section_of)), "calibration_spots": int(len(cal)),
        "sections": sections, "paper_context": PAPER_CONTEXT, "_predictions": predictions,
        "_image_paths": {s.name: str(s.image_path) for s in heldout.sections},
    }


def _mean_r(pred: np.ndarray, Y: np.ndarray) -> float:
    r = [pearson(pred[:, j], Y[:, j]) for j in range(Y.shape[1])]
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _spatial_checks(P: np.ndarray, Y: np.ndarray, names: list[str], blocks: np.ndarray,
                    depth: np.ndarray, block_measured: np.ndarray, n_boot: int) -> dict[str, Any]:
    """Block-bootstrap intervals, partial r given log depth, and block-level r of one method."""
    ids = np.unique(blocks)
    block_pred = np.stack([P[blocks == b].mean(axis=0) for b in ids])
    return {
        "r_ci95": {m: block_bootstrap_ci(lambda s, j=j: pearson(P[s, j], Y[s, j]), blocks, n_boot)
                   for j, m in enumerate(names)},
        "mean_r_ci95": block_bootstrap_ci(lambda s: _mean_r(P[s], Y[s]), blocks, n_boot),
        "partial_r_given_depth": {m: partial_pearson(P[:, j], Y[:, j], depth) for j, m in enumerate(names)},
        "block_r": pearson_per_column(block_pred, block_measured, names),
        "block_mean_r": _mean_r(block_pred, block_measured),
    }


def _block_log_cpm(counts: pd.DataFrame, genes: list[str], blocks: np.ndarray) -> np.ndarray:
    """(blocks, genes) log1p CPM of each block's summed counts: pooled, so shallow spots count less."""
    ids = np.unique(blocks)
    table = counts.reindex(columns=genes, fill_value=0).to_numpy(dtype=float)
    total = counts.to_numpy(dtype=float).sum(axis=1)
    return np.stack([np.log1p(table[blocks == b].sum(axis=0) / max(total[blocks == b].sum(), 1) * 1e6)
                     for b in ids])


def _spatial_blocks(spots: pd.DataFrame, size: int = BLOCK_SPOTS) -> np.ndarray:
    """Block id of each spot: `size` x `size` array positions (600 um squares for size 3)."""
    return ((spots["array_x"] // size) * 1000 + spots["array_y"] // size).to_numpy()


def _one_run(pred: np.ndarray, Y: np.ndarray, names: list[str], measured_dev: np.ndarray,
             predicted_dev: np.ndarray, calibrated: Optional[np.ndarray] = None) -> dict[str, Any]:
    r = pearson_per_column(pred, Y, names)
    return {"r": r, "mean_r": _mean_r(pred, Y),
            "mse": mse_per_column(pred if calibrated is None else calibrated, Y, names),
            "slide_r": pearson(predicted_dev, measured_dev),
            "slide_deviation": {"predicted": predicted_dev.tolist(), "measured": measured_dev.tolist()}}


def _over_seeds(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    agg: Callable[[str, str], dict] = lambda key, m: mean_std([run[key][m] for run in runs]).to_dict()
    return {
        "n_seeds": len(runs),
        "r": {m: agg("r", m) for m in names}, "mse": {m: agg("mse", m) for m in names},
        "mean_r": mean_std([run["mean_r"] for run in runs]).to_dict(),
        "mean_r_per_seed": [run["mean_r"] for run in runs],
        "slide_r": mean_std([run["slide_r"] for run in runs]).to_dict(),
        "slide_deviation": runs[0]["slide_deviation"],
    }


def _pooled_pseudobulk(table: SpotTable, genes: list[str]) -> np.ndarray:
    totals, gene_sums = 0.0, np.zeros(len(genes))
    for section in table.sections:
        counts = section.counts.loc[[s for n, s in zip(table.section_of, table.spot_ids) if n == section.name]]
        totals += counts.to_numpy(dtype=float).sum()
        gene_sums += counts.reindex(columns=genes, fill_value=0).to_numpy(dtype=float).sum(axis=0)
    return np.log1p(gene_sums / max(totals, 1) * 1e6)


def marker_targets(catalogue_entries: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Catalogue markers that have a ground-truth gene: name -> gene."""
    return {e["name"]: e["gene"] for e in catalogue_entries if e.get("kind") == "marker" and e.get("gene")}
