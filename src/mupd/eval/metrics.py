"""Metrics with their edge cases handled explicitly: a constant prediction has no Pearson r
(NaN, reported as undefined, never as 0), Frechet distances survive singular covariances
(N < D), KID is the unbiased kernel estimate beside FID."""

from __future__ import annotations

import math
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


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (the FID formula):
    |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a S_b)^(1/2).

    The trace of the matrix square root is computed exactly from the samples: with A, B the
    centred sets, the eigenvalues of S_a S_b are the squared singular values of
    A B^T / sqrt((m - 1)(n - 1)), so tr (S_a S_b)^(1/2) is the sum of those singular values.
    No sqrtm, hence no eps and no imaginary parts when the covariances are singular (N <= D, as
    for 2048-d Inception features of a hundred tiles).
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need >= 2 samples of equal dimension, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    ca, cb = a - mu1, b - mu2
    m, n = len(a), len(b)
    trace_sqrt = float(linalg.svdvals(ca @ cb.T).sum()) / math.sqrt((m - 1) * (n - 1))
    diff = mu1 - mu2
    tr_a, tr_b = float((ca * ca).sum()) / (m - 1), float((cb * cb).sum()) / (n - 1)
    return float(diff @ diff + tr_a + tr_b - 2 * trace_sqrt)


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased estimate of the squared
    MMD between two (N, D) feature sets with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3.

    Unbiased: the within-set sums leave out the diagonal, so two samples of one distribution
    average 0 (a single estimate can be slightly negative) whatever the set size, unlike FID.
    Computed on the whole sets (the paper's subsets of 1000 only bound cost; ours are smaller).
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need >= 2 samples of equal dimension, got {a.shape} and {b.shape}")
    d, m, n = a.shape[1], len(a), len(b)
    k_aa = (a @ a.T / d + 1) ** 3
    k_bb = (b @ b.T / d + 1) ** 3
    k_ab = (a @ b.T / d + 1) ** 3
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


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
