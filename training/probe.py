"""Linear probes of manifest columns on frozen embeddings, cross-validated with folds grouped by subject.

A categorical target gets a logistic regression (balanced accuracy, macro one-vs-rest AUC), a continuous
one a ridge regression (MAE, R^2), both on standardised features, as VoCo/y-aware/AMAES-style linear
evaluations do. The trivial baseline (majority class / the mean) runs through the same folds. A subject is
(dataset, subject): OpenMind's `sub-01` recurs in every dataset, and no subject's volumes may sit on both
sides of a split, or a probe could score by recognising the person rather than the property.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from openmind_tools.errors import ConfigError

KINDS = ("categorical", "continuous")
METRICS = {"categorical": ("balanced_accuracy", "macro_auc"), "continuous": ("mae", "r2")}
BASELINE = "baseline"  # the name of the trivial predictor's column in every result


@dataclass(frozen=True)
class ProbeResult:
    """One target's scores: per predictor ("pretrained", "random", "baseline") and metric, one value per fold."""

    target: str
    kind: str
    scores: dict[str, dict[str, list[float]]]  # predictor -> metric -> fold values (NaN where undefined)
    n: int  # rows probed
    groups: int  # subjects among them
    folds: int
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def summary(self) -> pd.DataFrame:
        """One row per (metric, predictor): mean and std over the folds where the metric is defined."""
        rows = []
        for predictor, metrics in self.scores.items():
            for metric, values in metrics.items():
                finite = np.array([v for v in values if np.isfinite(v)])
                rows.append(
                    {
                        "target": self.target,
                        "kind": self.kind,
                        "metric": metric,
                        "encoder": predictor,
                        "mean": float(finite.mean()) if finite.size else float("nan"),
                        "std": float(finite.std()) if finite.size else float("nan"),
                        "folds": int(finite.size),
                        "n": self.n,
                        "subjects": self.groups,
                    }
                )
        return pd.DataFrame(rows)


def target_kind(values: pd.Series) -> str:
    """Numbers (not booleans) are continuous; strings, categories and booleans are categorical."""
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return "continuous" if numeric else "categorical"


def subject_groups(rows: pd.DataFrame) -> np.ndarray:
    """The subject of each row as "dataset/subject" (a row without a subject is its own group)."""
    subject = rows["subject"] if "subject" in rows else pd.Series(None, index=rows.index, dtype=object)
    own = rows["id"].astype(str)
    return np.where(subject.notna(), rows["dataset"].astype(str) + "/" + subject.astype(str), "volume:" + own)


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, *, kind: str, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test index pairs with no group on both sides.

    Categorical: stratified, with at most as many folds as the rarest class has subjects, so every test
    side holds every class. Continuous: at most half as many folds as subjects, so with 4 or more subjects a
    test side holds two or more (R^2 needs more than one value). Never fewer than two folds.
    """
    groups = np.asarray(groups)
    subjects = len(np.unique(groups))
    if subjects < 2:
        raise ValueError(f"needs at least 2 subjects for grouped cross-validation, got {subjects}")
    if kind == "categorical":
        rarest = pd.Series(groups).groupby(pd.Series(y)).nunique().min()
        splitter = StratifiedGroupKFold(n_splits=max(2, min(folds, rarest)), shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=max(2, min(folds, subjects // 2)), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only N members"
        return list(splitter.split(np.zeros(len(y)), y, groups))


def probe(
    features: Mapping[str, np.ndarray],
    values: pd.Series,
    groups: np.ndarray,
    *,
    target: str,
    kind: str | None = None,
    folds: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """Probe `values` (one per row of every feature matrix) from each named feature matrix, and the baseline.

    Rows without a value are left out; for a categorical target so are classes seen in fewer than two
    subjects (grouped folds can never put them on both sides). Counts of both are in `left_out`.
    """
    kind = kind or target_kind(values)
    if kind not in KINDS:
        raise ConfigError(f"{target}: expected a kind in {KINDS}, got {kind!r}")
    values = values.reset_index(drop=True)
    keep = values.notna().to_numpy().copy()
    left_out = {"no value": int((~keep).sum())}
    if kind == "categorical":
        labels = values.astype(str).where(values.notna())
        subjects_per_class = pd.Series(groups).where(keep).groupby(labels).nunique()
        rare = labels.isin(subjects_per_class.index[subjects_per_class < 2]).to_numpy()
        left_out["class in < 2 subjects"] = int((rare & keep).sum())
        keep &= ~rare
        y = labels.to_numpy()[keep]
        if len(np.unique(y)) < 2:
            raise ConfigError(f"{target}: fewer than 2 classes seen in 2 or more subjects: nothing to probe")
    else:
        try:
            y = values.to_numpy(dtype=float)[keep]
        except (TypeError, ValueError):
            raise ConfigError(f"{target}: a continuous target needs numbers, got {values.dtype}") from None
        finite = np.isfinite(y)
        left_out["not finite"] = int((~finite).sum())
        keep[np.flatnonzero(keep)[~finite]] = False
        y = y[finite]
        if np.unique(y).size < 2:
            raise ConfigError(f"{target}: fewer than 2 distinct values: nothing to probe")
    kept_groups = np.asarray(groups)[keep]
    try:
        splits = grouped_folds(y, kept_groups, kind=kind, folds=folds, seed=seed)
    except ValueError as e:
        raise ConfigError(f"{target}: {e}") from None
    predictors = {name: np.asarray(x, dtype=np.float64)[keep] for name, x in features.items()}
    predictors[BASELINE] = np.zeros((len(y), 1))
    scores = {name: _cross_validate(x, y, splits, kind, baseline=name == BASELINE) for name, x in predictors.items()}
    return ProbeResult(
        target,
        kind,
        scores,
        int(keep.sum()),
        len(np.unique(kept_groups)),
        len(splits),
        {k: v for k, v in left_out.items() if v},
    )


def _cross_validate(
    x: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], kind: str, baseline: bool
) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {metric: [] for metric in METRICS[kind]}
    for train, test in splits:
        model = _model(kind, baseline)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. a class absent from one fold's test side
            model.fit(x[train], y[train])
            if kind == "categorical":  # a test side with one class has no balanced accuracy to speak of
                defined = np.unique(y[test]).size > 1
                scores["balanced_accuracy"].append(
                    balanced_accuracy_score(y[test], model.predict(x[test])) if defined else float("nan")
                )
                scores["macro_auc"].append(macro_auc(y[test], model.predict_proba(x[test]), model.classes_))
            else:
                predicted = model.predict(x[test])
                scores["mae"].append(mean_absolute_error(y[test], predicted))
                defined = np.unique(y[test]).size > 1  # R^2 of a constant target is undefined
                scores["r2"].append(r2_score(y[test], predicted) if defined else float("nan"))
    return {metric: [float(v) for v in values] for metric, values in scores.items()}


def _model(kind: str, baseline: bool):
    if kind == "categorical":
        if baseline:
            return DummyClassifier(strategy="most_frequent")
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    if baseline:
        return DummyRegressor(strategy="mean")
    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))


def macro_auc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes that have positives and negatives in this fold (NaN if none).

    A class the fold's training side never saw scores 0.5 (the model gives it no probability).
    """
    column = {c: i for i, c in enumerate(classes)}
    aucs = []
    for c in np.unique(y):
        positive = y == c
        if positive.all():
            continue
        score = proba[:, column[c]] if c in column else np.zeros(len(y))
        aucs.append(roc_auc_score(positive, score))
    return float(np.mean(aucs)) if aucs else float("nan")
