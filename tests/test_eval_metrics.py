"""Metrics and handcrafted features: edge cases that must not turn into silent numbers."""

import math

import numpy as np
import pytest
from skimage import data

from mupd.errors import ConditionError
from mupd.eval.features import FEATURE_NAMES, features, tile_features
from mupd.eval.metrics import (block_bootstrap_ci, frechet_distance, kid, mean_std, partial_pearson,
                               pearson, pearson_per_column)
from mupd.eval.report import fmt, public


def test_pearson_is_undefined_for_a_constant_prediction():
    assert math.isnan(pearson([2.0] * 5, [1, 2, 3, 4, 5]))
    assert math.isnan(pearson([1, 2], [2, 1]))  # too few points
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8.5]) > 0.99
    assert pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_per_column_matches_numpy_and_checks_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    r = pearson_per_column(a, b, ["x", "y", "z"])
    assert r["y"] == pytest.approx(np.corrcoef(a[:, 1], b[:, 1])[0, 1])
    with pytest.raises(ValueError):
        pearson_per_column(a, b[:, :2], ["x", "y", "z"])


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0, 0, 0.5, 0])
    assert frechet_distance(x, x + shift) == pytest.approx(shift @ shift, rel=1e-6)
    wider = frechet_distance(x, rng.normal(scale=3.0, size=(400, 6)))
    assert wider > 6 * (3 - 1) ** 2 * 0.8  # trace term of the variance change


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))  # n < d: rank-deficient
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_frechet_distance_trace_term_matches_sqrtm_when_covariances_are_full_rank():
    from scipy import linalg

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 0.5
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    direct = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-9)
    wide = rng.normal(size=(40, 2048))  # n << D, as Inception features of a few dozen tiles
    assert frechet_distance(wide, wide) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(wide[:20], wide[20:]) > 0


def _kid_by_loops(x, y):
    k = lambda u, v: (u @ v / len(u) + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_cubic_kernel_mmd():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(7, 5)) + 0.3
    assert kid(x, y) == pytest.approx(_kid_by_loops(x, y), rel=1e-10)
    assert kid(x, y) == pytest.approx(kid(y, x), rel=1e-12)  # symmetric
    big = rng.normal(size=(400, 6))
    # identical sets: only the left-out diagonal separates it from 0, O(1/n)
    assert abs(kid(big, big)) < 0.05
    assert kid(big, big + np.array([1.0, -1.0, 0, 0, 0.5, 0])) > 1.0
    # unbiased: two samples of one distribution average 0 at small n, where FID stays well above 0
    pairs = [(rng.normal(size=(20, 6)), rng.normal(size=(20, 6))) for _ in range(200)]
    kids = np.array([kid(p, q) for p, q in pairs])
    assert abs(kids.mean()) < 3 * kids.std() / np.sqrt(len(kids))
    assert np.mean([frechet_distance(p, q) for p, q in pairs]) > 1.0
    with pytest.raises(ValueError):
        kid(big[:1], big)
    with pytest.raises(ValueError):
        kid(big, big[:, :3])


def test_mean_std_leaves_undefined_values_out_and_reports_them_as_such():
    m = mean_std([0.2, float("nan"), 0.4])
    assert (m.n, m.mean) == (2, pytest.approx(0.3))
    assert m.std == pytest.approx(np.std([0.2, 0.4], ddof=1))
    none = mean_std([float("nan")])
    assert none.n == 0 and fmt(none.to_dict()) == "undefined"
    assert public({"r": float("nan"), "_private": 1}) == {"r": None}


def test_features_on_real_ihc_find_nuclei_and_none_on_blank_glass():
    ihc = data.immunohistochemistry()[:256, :256]
    f = dict(zip(FEATURE_NAMES, tile_features(ihc, mpp=0.5)))
    assert len(f) == len(FEATURE_NAMES) and all(np.isfinite(list(f.values())))
    assert f["nuclei_per_mm2_tissue"] > 100 and 8 <= f["nucleus_area_mean_um2"] <= 150
    assert f["dab_mean"] > 0  # the FHL2 image is DAB-stained
    blank = dict(zip(FEATURE_NAMES, tile_features(np.full((128, 128, 3), 245, np.uint8), 0.5)))
    assert blank["nuclei_per_mm2_tissue"] == 0 and blank["tissue_fraction"] == 0
    assert features([], 0.5).shape == (0, len(FEATURE_NAMES))
    with pytest.raises(ConditionError, match="uint8"):
        tile_features(ihc.astype(np.float32), 0.5)


def test_block_bootstrap_interval_covers_the_truth_and_widens_with_correlated_blocks():
    rng = np.random.default_rng(3)
    block = np.arange(400) // 20  # 20 blocks of 20 spots sharing block-level signal
    a, c = rng.normal(size=20), rng.normal(size=20)
    x = a[block] + 0.3 * rng.normal(size=400)
    y = 0.5 * a[block] + c[block] + 0.3 * rng.normal(size=400)
    stat = lambda s: pearson(x[s], y[s])  # noqa: E731
    lo, hi = block_bootstrap_ci(stat, np.arange(400), n_boot=300)  # as if spots were independent
    assert lo < pearson(x, y) < hi
    lo_b, hi_b = block_bootstrap_ci(stat, block, n_boot=300)
    assert hi_b - lo_b > 1.5 * (hi - lo)
    assert all(math.isnan(v) for v in block_bootstrap_ci(lambda s: float("nan"), np.arange(10), n_boot=20))


def test_partial_pearson_removes_a_shared_confounder():
    rng = np.random.default_rng(4)
    depth = rng.normal(size=500)
    pred, true = depth + 0.3 * rng.normal(size=500), depth + 0.3 * rng.normal(size=500)
    assert pearson(pred, true) > 0.8
    assert abs(partial_pearson(pred, true, depth)) < 0.15
    assert math.isnan(partial_pearson(pred, true, np.ones(500)))
