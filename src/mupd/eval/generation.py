"""Tasks 2 and 3: RNA->H&E and text->H&E, scored on held-out real tiles.

Distances compare equal-sized sets: per seed the held-out real tiles are split in two halves A
and B; the floor is d(real A, real B), MuPD is d(tiles generated from A's RNA, real B), the
unconditional model d(unconditional samples, real B). Feature spaces: the handcrafted features
z-scored with the training tiles' mean and std (so every feature weighs alike), FD; the TF-FID
InceptionV3 pool3 features (`pretrained.InceptionFeatures`), FID and KID; an optional
user-supplied encoder, FD. At a hundred-odd tiles per set FID is biased upward (its bias falls
with n, so it is comparable only at equal n); KID is unbiased, so it is reported beside it.

RNA alignment: the ridge H&E->RNA scorer (trained on the training patient) predicts marker
expression from each generated tile; its mean per-gene Pearson r with the RNA the tile was
conditioned on is reported beside the same score for the real tiles of those spots (what a
perfect generator could reach through this scorer) and for unconditional samples (chance).

Text alignment: per attribute (a marker high / low, split at each training section's median
so depth does not decide), a logistic scorer trained on training tiles classifies generated
tiles; the score is the fraction classified as the prompt asked, beside the scorer's balanced
accuracy on held-out real tiles.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .baselines import RidgeBaseline, fit_logistic
from .features import features
from .metrics import frechet_distance, kid, mean_std, pearson_per_column
from .spots import SpotTable

DEFAULT_PROMPT = "H&E breast cancer tissue, {marker}-{level}"


class FeatureSpace:
    """Handcrafted features z-scored by the training tiles, the Inception (FID / KID) features
    when an extractor is given (run_evaluation always gives one), and an optional encoder."""

    def __init__(self, train: SpotTable, encoder: Any = None, inception: Any = None) -> None:
        self.mpp = train.mpp
        self.mu = train.features.mean(axis=0)
        self.sd = np.where(train.features.std(axis=0) > 0, train.features.std(axis=0), 1.0)
        self.encoder = encoder
        self.inception = inception

    def handcrafted(self, tiles: np.ndarray, precomputed: Optional[np.ndarray] = None) -> np.ndarray:
        raw = precomputed if precomputed is not None else features(tiles, self.mpp)
        return (raw - self.mu) / self.sd


def _fd_row(space: FeatureSpace, sets: dict[str, np.ndarray], reference: np.ndarray,
            precomputed: dict[str, np.ndarray], inception_pre: Optional[dict[str, np.ndarray]] = None
            ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(FD per feature space, KID per feature space) of every set against `reference`."""
    row = {"handcrafted": {k: frechet_distance(space.handcrafted(v, precomputed.get(k)),
                                               space.handcrafted(reference, precomputed.get("_ref")))
                           for k, v in sets.items()}}
    kids: dict[str, dict[str, float]] = {}
    if space.inception is not None:
        pre = inception_pre or {}
        ref = pre["_ref"] if "_ref" in pre else space.inception(reference)
        feats = {k: pre[k] if k in pre else space.inception(v) for k, v in sets.items()}
        row["inception"] = {k: frechet_distance(f, ref) for k, f in feats.items()}
        kids["inception"] = {k: kid(f, ref) for k, f in feats.items()}
    if space.encoder is not None:
        ref = space.encoder(reference)
        row["encoder"] = {k: frechet_distance(space.encoder(v), ref) for k, v in sets.items()}
    return row, kids


def evaluate_rna_to_he(pipeline: Any, train: SpotTable, heldout: SpotTable, genes: Sequence[str],
                       scorer: RidgeBaseline, space: FeatureSpace, seeds: Sequence[int],
                       n_tiles: int, steps: int, progress: ProgressCallback = no_progress,
                       cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    """`n_tiles` per set (at most half the held-out tiles): real half A, generated from A's RNA,
    unconditional, each against real half B."""
    genes = list(genes)
    half = min(n_tiles, len(heldout) // 2)
    if half < 2:
        raise ValueError(f"RNA->H&E needs >= 4 held-out tiles, got {len(heldout)}")
    runs, examples = [], None
    real_inception = space.inception(heldout.tiles) if space.inception is not None else None
    for k, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(heldout))
        a, b = np.sort(order[:half]), np.sort(order[half:2 * half])
        real_a, real_b = heldout.tiles[a], heldout.tiles[b]
        sets: dict[str, np.ndarray] = {"real (other half)": real_a}
        pre = {"real (other half)": heldout.features[a], "_ref": heldout.features[b]}
        inception_pre = ({"real (other half)": real_inception[a], "_ref": real_inception[b]}
                         if real_inception is not None else None)
        if pipeline is not None:
            generated = []
            for i, profile in enumerate(heldout.profiles(a)):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                generated.append(pipeline.generate(rna=profile, stain="H&E", num_images=1, steps=steps,
                                                   seed=seed * 100_003 + i)[0])
                progress(ProgressEvent("rna->H&E", k * half + i + 1, len(seeds) * half, f"seed {seed}"))
            sets["MuPD (RNA)"] = np.stack(generated)
            sets["MuPD (unconditional)"] = np.asarray(
                pipeline.generate(stain="H&E", num_images=half, steps=steps, seed=seed))
        fd, kids = _fd_row(space, sets, real_b, pre, inception_pre)
        truth = heldout.expression[genes].to_numpy()[a]
        align = {}
        for key, tiles in sets.items():
            f = pre.get(key) if key in pre else features(tiles, space.mpp)
            r = pearson_per_column(scorer.predict(f), truth, genes)
            align[key.replace("real (other half)", "real tiles of the same spots")] = _nanmean(r.values())
        runs.append({"fd": fd, "kid": kids, "alignment": align})
        if examples is None:
            examples = {k: v[:6] for k, v in sets.items()}
            examples["real (same spots)"] = real_a[:6]
    return {"n_per_set": int(half), "n_heldout_tiles": int(len(heldout)), "seeds": list(seeds),
            "fd": _aggregate([r["fd"] for r in runs]),
            "kid": _aggregate([r["kid"] for r in runs]) if runs[0]["kid"] else {},
            "alignment": {k: mean_std([r["alignment"][k] for r in runs]).to_dict()
                          for k in runs[0]["alignment"]},
            "feature_spaces": {
                "handcrafted": "the named features of mupd/eval/features.py, z-scored by the training tiles",
                "inception": getattr(space.inception, "name", None),
                "encoder": getattr(space.encoder, "name", None)},
            "encoder": getattr(space.encoder, "name", None), "_examples": examples}


def attribute_labels(table: SpotTable, gene: str) -> np.ndarray:
    """1 where the gene is above its section's median (depth-robust high/low), else 0."""
    values = table.expression[gene].to_numpy()
    labels = np.zeros(len(table), dtype=int)
    for name in dict.fromkeys(table.section_of):
        idx = table.section_index(name)
        labels[idx] = values[idx] > np.median(values[idx])
    return labels


def evaluate_text_to_he(pipeline: Any, train: SpotTable, heldout: SpotTable,
                        attributes: dict[str, str], seeds: Sequence[int], n_tiles: int, steps: int,
                        prompt: str = DEFAULT_PROMPT, progress: ProgressCallback = no_progress,
                        cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score

    results, examples = {}, {}
    groups = list(train.section_of)
    for step, (marker, gene) in enumerate(attributes.items()):
        scorer = fit_logistic(train.features, attribute_labels(train, gene), groups)
        held_labels = attribute_labels(heldout, gene)
        for level, want in (("high", 1), ("low", 0)):
            real = heldout.tiles[held_labels == want][:4]
            examples[f"real {marker}-{level}"] = real
        entry: dict[str, Any] = {
            "gene": gene,
            "scorer_heldout_balanced_accuracy": float(balanced_accuracy_score(
                held_labels, scorer.predict(heldout.features))) if len(set(held_labels)) > 1 else None,
        }
        if pipeline is not None:
            hits: dict[str, list[float]] = {"high": [], "low": []}
            for seed in seeds:
                for level, want in (("high", 1), ("low", 0)):
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    text = prompt.format(marker=marker, level=level)
                    tiles = np.asarray(pipeline.generate(text=text, stain="H&E", num_images=n_tiles,
                                                         steps=steps, seed=seed))
                    hits[level].append(float(np.mean(scorer.predict(features(tiles, train.mpp)) == want)))
                    examples.setdefault(f"MuPD {marker}-{level}", tiles[:4])
            entry["prompt_agreement"] = {k: mean_std(v).to_dict() for k, v in hits.items()}
            entry["prompt_agreement_mean"] = mean_std(
                [(h + l) / 2 for h, l in zip(hits["high"], hits["low"])]).to_dict()
        results[marker] = entry
        progress(ProgressEvent("text->H&E", step + 1, len(attributes), marker))
    return {"attributes": results, "prompt_template": prompt, "n_per_prompt": n_tiles,
            "seeds": list(seeds) if pipeline is not None else [], "chance": 0.5,
            "_examples": examples}


def _nanmean(values: Any) -> float:
    v = np.asarray(list(values), dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _aggregate(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    return {space: {k: mean_std([r[space][k] for r in rows]).to_dict() for k in rows[0][space]}
            for space in rows[0]}
