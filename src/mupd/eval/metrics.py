"""Metrics with their edge cases handled explicitly: a constant prediction has no Pearson r
(NaN, reported as undefined, never as 0), Frechet distances survive singular covariances."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import linalg


def pearson(pred: Sequence[float], true: Sequence[float]) -> float:
    """Pearson r, or NaN when it is undefined (fewer than 3 points, or either side constant)."""
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / math.sqrt((x @ x) * (y @ y)))


def partial_pearson(pred: Sequence[float], true: Sequence[float], control: Sequence[float]) -> float:
    """Pearson r of pred and true with `control` regressed out of both (NaN when undefined)."""
    r_pt, r_pc, r_tc = pearson(pred, true), pearson(pred, control), pearson(true, control)
    denom = (1 - r_pc**2) * (1 - r_tc**2)
    if not np.isfinite([r_pt, r_pc, r_tc]).all() or denom <= 0:
        return math.nan
    return float((r_pt - r_pc * r_tc) / math.sqrt(denom))


def pearson_per_column(pred: np.ndarray, true: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Pearson r of each column (marker) of (N, M) predictions against (N, M) measurements."""
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != len(names):
        raise ValueError(f"shapes {pred.shape} / {true.shape} do not match {len(names)} names")
    return {n: pearson(pred[:, j], true[:, j]) for j, n in enumerate(names)}


def mse_per_column(pred: np.ndarray, true: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {n: float(np.mean((np.asarray(pred)[:, j] - np.asarray(true)[:, j]) ** 2))
            for j, n in enumerate(names)}


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (the FID formula).

    As in pytorch-fid: if sqrtm of the covariance product is singular or not finite, `eps` is
    added to both diagonals; a small imaginary part from numerical error is dropped, a large one
    is an error.
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need >= 2 samples of equal dimension, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            raise ValueError(f"sqrtm gave a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@dataclass
class MeanStd:
    """Mean +/- sample std over seeds; `n` counts the defined (finite) values."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        if self.n == 0:
            return "undefined"
        if self.n == 1:
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.std:.3f}"

    def to_dict(self) -> dict[str, float | int | None]:
        clean = lambda v: None if math.isnan(v) else v  # noqa: E731 - JSON has no NaN
        return {"mean": clean(self.mean), "std": clean(self.std), "n": self.n}


def mean_std(values: Iterable[float]) -> MeanStd:
    """Over seeds; NaN values (undefined metrics) are left out and `n` says how many remain."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    return MeanStd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


def block_bootstrap_ci(statistic: Callable[[np.ndarray], float], blocks: Sequence[int],
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `statistic(index)` resampling whole spatial blocks with replacement.

    Neighbouring spots are correlated, so resampling single spots would overstate precision;
    blocks (e.g. 3x3 array positions) keep that correlation inside each draw. Draws where the
    statistic is undefined are left out; (nan, nan) if fewer than half are defined.
    """
    blocks = np.asarray(blocks)
    ids = np.unique(blocks)
    members = [np.flatnonzero(blocks == b) for b in ids]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), size=len(ids))
        values.append(statistic(np.concatenate([members[i] for i in pick])))
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < n_boot / 2:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, (tail, 100 - tail))
    return float(lo), float(hi)
