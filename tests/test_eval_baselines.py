"""Baselines on real HER2ST spots with the patient-level split (train C, test B4 / A1)."""

import math
import warnings

import numpy as np
import pytest
from PIL import Image

from mupd.errors import DataError
from mupd.eval.augment import tertile_classes
from mupd.eval.baselines import RidgeBaseline, TrainingMeanBaseline, fit_logistic
from mupd.eval.features import features
from mupd.data.sections import TRAIN_SECTIONS, footprint_mask, load_section, masked_box
from mupd.eval.metrics import frechet_distance, pearson
from mupd.eval.spots import build_spot_table

GENES = ["ERBB2", "KRT19"]


@pytest.fixture(scope="module")
def tables(shared_data):
    train = build_spot_table(shared_data, TRAIN_SECTIONS, GENES, 128, 1.0, max_spots=120)
    b4 = build_spot_table(shared_data, ["B4"], GENES, 128, 1.0)
    return train, b4


def test_sections_mpp_comes_from_the_spot_pitch(shared_data):
    b4, a1 = load_section(shared_data, "B4"), load_section(shared_data, "A1")
    assert b4.mpp == pytest.approx(0.69, abs=0.02) and a1.mpp == pytest.approx(3.2, abs=0.1)
    x0, y0, x1, y1 = masked_box("A1")  # the pasted annotation thumbnail
    assert not ((a1.spots.image_x >= x0) & (a1.spots.image_y < y1)).any()
    thumb = np.asarray(Image.open(a1.image_path).convert("L"))[y0:y1, x0:x1]
    assert (thumb > 0).mean() > 0.9 and (np.asarray(Image.open(a1.image_path).convert("L"))[y1 + 5, x0:x1] == 0).all()
    with pytest.warns(UserWarning, match="A1.*CD3E"):
        assert (a1.log_cpm(["CD3E"])["CD3E"] == 0).all()
    tiles = a1.tiles(list(a1.spots.index[:2]), 64, 1.0)  # 3.2 um/px resampled to 1 um/px
    assert tiles.shape == (2, 64, 64, 3) and tiles.std() > 5
    with pytest.raises(DataError, match="Z9"):
        load_section(shared_data, "Z9")


def test_ridge_trained_on_patient_c_predicts_erbb2_on_held_out_b4(tables):
    train, b4 = tables
    Y = train.expression[GENES].to_numpy()
    ridge = RidgeBaseline().fit(train.features, Y, list(train.section_of))
    pred = ridge.predict(b4.features)
    truth = b4.expression[GENES].to_numpy()
    r_erbb2 = pearson(pred[:, 0], truth[:, 0])
    print(f"ridge (C, {len(train)} spots) -> B4 ({len(b4)} spots): r ERBB2 {r_erbb2:.3f}, "
          f"KRT19 {pearson(pred[:, 1], truth[:, 1]):.3f}, alphas {ridge.alphas_}")
    assert r_erbb2 > 0.2
    mean = TrainingMeanBaseline().fit(train.features, Y).predict(b4.features)
    assert math.isnan(pearson(mean[:, 0], truth[:, 0]))
    assert np.mean((pred[:, 0] - truth[:, 0]) ** 2) < np.mean((mean[:, 0] - truth[:, 0]) ** 2)


def test_ridge_needs_two_training_sections(tables):
    train, _ = tables
    with pytest.raises(DataError, match="2 training sections"):
        RidgeBaseline().fit(train.features, train.expression[GENES].to_numpy(), ["C2"] * len(train))


def test_real_halves_are_closer_than_real_vs_degraded_tiles(tables):
    train, b4 = tables
    mu, sd = train.features.mean(0), train.features.std(0) + 1e-9
    rng = np.random.default_rng(0)
    order = rng.permutation(len(b4))
    a, b = order[: len(b4) // 2], order[len(b4) // 2:]
    floor = frechet_distance((b4.features[a] - mu) / sd, (b4.features[b] - mu) / sd)
    faded = (255 - (255 - b4.tiles[a].astype(np.float32)) * 0.6).astype(np.uint8)  # washed-out stain
    degraded = frechet_distance((features(faded, 1.0) - mu) / sd, (b4.features[b] - mu) / sd)
    print(f"FD real/real {floor:.2f} vs real/faded {degraded:.2f}")
    assert floor < degraded / 2


def test_tertile_classes_are_per_section_and_leave_the_middle_out(tables):
    train, _ = tables
    labels = tertile_classes(train, "ERBB2")
    for name in TRAIN_SECTIONS:
        idx = train.section_index(name)
        assert (labels[idx] == 1).sum() > 0 and (labels[idx] == 0).sum() > 0
    assert (labels == -1).any()


def test_footprint_is_the_100um_spot_or_the_whole_tile():
    mask = footprint_mask(128, 1.0)
    assert mask.sum() == pytest.approx(np.pi * 50**2, rel=0.02)
    assert footprint_mask(32, 1.0).all()


def test_logistic_scorer_skips_folds_a_single_class_cannot_score(tables):
    train, _ = tables
    y = (train.expression["ERBB2"].to_numpy() > np.median(train.expression["ERBB2"])).astype(int)
    y[train.section_of == "C2"] = 0  # as if the gene were undetected in one section
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN fold scores, no silent default pick
        model = fit_logistic(train.features, y, list(train.section_of))
    assert set(model.predict(train.features)) == {0, 1}
