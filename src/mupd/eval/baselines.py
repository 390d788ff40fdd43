"""Baselines trained on the same split as the model: the training-mean predictor and ridge
regression on handcrafted features with its penalty chosen by cross-validation grouped by
section, inside the training patient only (so no held-out spot ever shapes it)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import DataError

RIDGE_ALPHAS = tuple(np.logspace(-2, 5, 15))
LOGISTIC_CS = tuple(np.logspace(-3, 2, 6))


class TrainingMeanBaseline:
    """Predicts each target's training mean everywhere: zero variance, so its Pearson r is
    undefined; it is reported through its MSE."""

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: Sequence[str] | None = None) -> "TrainingMeanBaseline":
        self.mean_ = np.asarray(Y, np.float64).mean(axis=0)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.tile(self.mean_, (len(X), 1))


def _group_cv(groups: Sequence[str]) -> GroupKFold:
    n = len(set(groups))
    if n < 2:
        raise DataError(f"grouped cross-validation needs >= 2 training sections, got {n}")
    return GroupKFold(n_splits=min(5, n))


class RidgeBaseline:
    """Standardised features -> ridge, one penalty per target, chosen by GroupKFold over sections."""

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: Sequence[str]) -> "RidgeBaseline":
        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        cv = _group_cv(groups)
        self.models_: list[Pipeline] = []
        self.alphas_: list[float] = []
        for j in range(Y.shape[1]):
            search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()),
                                  {"ridge__alpha": RIDGE_ALPHAS}, cv=cv,
                                  scoring="neg_mean_squared_error")
            search.fit(X, Y[:, j], groups=groups)
            self.models_.append(search.best_estimator_)
            self.alphas_.append(float(search.best_params_["ridge__alpha"]))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.stack([m.predict(np.asarray(X, np.float64)) for m in self.models_], axis=1)


def fit_logistic(X: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None) -> Pipeline:
    """Standardised features -> logistic regression; C by GroupKFold over sections when groups
    are given (held-out scorers), a fixed C=1 otherwise (few-shot sets are too small to tune).
    Folds whose held-out section has one class only (a gene undetected there) cannot score a
    balanced accuracy and are left out; with none left, C stays 1."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    y = np.asarray(y)
    if groups is None:
        return model.fit(X, y)
    folds = [(train, test) for train, test in _group_cv(groups).split(X, y, groups)
             if len(np.unique(y[test])) == 2 and len(np.unique(y[train])) == 2]
    if not folds:
        return model.fit(X, y)
    search = GridSearchCV(model, {"logisticregression__C": LOGISTIC_CS}, cv=folds,
                          scoring="balanced_accuracy")
    return search.fit(X, y).best_estimator_
