"""Linear probes on synthetic embeddings: grouped folds, chance on shuffled labels, what is left out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from openmind_tools.errors import ConfigError
from training.probe import grouped_folds, probe, subject_groups, target_kind


def _manifest(datasets: int = 8, subjects: int = 5, volumes: int = 3, seed: int = 0) -> pd.DataFrame:
    """OpenMind-like rows: `sub-01`.. recur in every dataset, several volumes per subject."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(datasets):
        for s in range(subjects):
            age, sex = float(rng.integers(18, 90)), str(rng.choice(["F", "M"]))
            for v in range(volumes):
                rows.append(
                    {
                        "id": f"ds{d:06d}/sub-{s + 1:02d}/anat/sub-{s + 1:02d}_run-{v}_T1w",
                        "dataset": f"ds{d:06d}",
                        "subject": f"sub-{s + 1:02d}",
                        "age": age,
                        "sex": sex,
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["categorical", "continuous"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_put_a_subject_on_both_sides(kind: str, seed: int) -> None:
    rows = _manifest(seed=seed)
    groups = subject_groups(rows)
    assert len(np.unique(groups)) == 40  # sub-01 of ds000000 is not sub-01 of ds000001
    y = rows["sex"].to_numpy() if kind == "categorical" else rows["age"].to_numpy()
    splits = grouped_folds(y, groups, kind=kind, folds=5, seed=seed)
    assert len(splits) == 5
    tested = np.concatenate([test for _, test in splits])
    assert sorted(tested) == list(range(len(rows)))  # every row tested exactly once
    for train, test in splits:
        assert not set(groups[train]) & set(groups[test])
        if kind == "categorical":
            assert set(y[test]) == {"F", "M"}  # stratified: every class on every test side


def test_a_probe_finds_a_signal_and_shuffled_labels_score_at_chance() -> None:
    rows = _manifest(datasets=20, subjects=5, volumes=2)
    rng = np.random.default_rng(0)
    sex = (rows["sex"] == "F").to_numpy()
    informative = rng.normal(size=(len(rows), 16))
    informative[:, 0] += np.where(sex, 2.0, -2.0)  # one feature carries the label
    noise = rng.normal(size=(len(rows), 16))
    features = {"pretrained": informative, "random": noise}
    groups = subject_groups(rows)

    found = probe(features, rows["sex"], groups, target="sex").summary().set_index(["metric", "encoder"])["mean"]
    assert found["balanced_accuracy", "pretrained"] > 0.9 and found["macro_auc", "pretrained"] > 0.95
    assert abs(found["balanced_accuracy", "random"] - 0.5) < 0.1
    assert found["balanced_accuracy", "baseline"] == 0.5 and found["macro_auc", "baseline"] == 0.5

    # Shuffle whole subjects' labels (a volume-level shuffle would split a subject's label): chance for all.
    subjects = pd.unique(groups)
    flipped = dict(
        zip(subjects, rng.permutation(rows.groupby(groups)["sex"].first().loc[subjects].to_numpy()), strict=True)
    )
    shuffled = pd.Series([flipped[g] for g in groups])
    chance = probe(features, shuffled, groups, target="sex").summary().set_index(["metric", "encoder"])["mean"]
    assert abs(chance["balanced_accuracy", "pretrained"] - 0.5) < 0.12
    assert abs(chance["macro_auc", "pretrained"] - 0.5) < 0.12


def test_a_continuous_target_is_probed_by_ridge_against_the_mean() -> None:
    rows = _manifest(datasets=10, subjects=4, volumes=2)
    rng = np.random.default_rng(1)
    age = rows["age"].to_numpy()
    features = {
        "pretrained": np.column_stack([age + rng.normal(0, 2, len(age)), rng.normal(size=(len(age), 7))]),
        "random": rng.normal(size=(len(age), 8)),
    }
    result = probe(features, rows["age"], subject_groups(rows), target="age")
    assert result.kind == "continuous" and result.folds == 5
    found = result.summary().set_index(["metric", "encoder"])["mean"]
    assert found["r2", "pretrained"] > 0.9 and found["mae", "pretrained"] < 0.3 * found["mae", "baseline"]
    assert found["r2", "random"] < 0.1 and found["r2", "baseline"] <= 0.0


def test_rows_without_a_value_and_classes_of_one_subject_are_left_out_and_counted() -> None:
    rows = _manifest(datasets=4, subjects=3, volumes=2)
    rows.loc[:3, "age"] = np.nan
    rows.loc[:1, "sex"] = None
    rows.loc[2:3, "sex"] = "X"  # rows 2-3 are ds000000/sub-02, rows 4-5 ds000000/sub-03: a class of one subject
    rows.loc[4:5, "sex"] = "Y"  # can never be both trained and tested on
    features = {"pretrained": np.random.default_rng(0).normal(size=(len(rows), 4))}
    groups = subject_groups(rows)
    sex = probe(features, rows["sex"], groups, target="sex")
    assert sex.left_out == {"no value": 2, "class in < 2 subjects": 4}
    assert sex.n == len(rows) - 6
    age = probe(features, rows["age"], groups, target="age")
    assert age.left_out == {"no value": 4} and age.n == len(rows) - 4


def test_kinds_and_impossible_targets() -> None:
    assert target_kind(pd.Series([1.5, 3.0])) == "continuous"
    assert target_kind(pd.Series(["F", "M"])) == target_kind(pd.Series([True, False])) == "categorical"
    rows = _manifest(datasets=2, subjects=2, volumes=1)
    features = {"pretrained": np.zeros((len(rows), 2))}
    with pytest.raises(ConfigError, match="fewer than 2 classes"):
        probe(features, pd.Series(["F"] * len(rows)), subject_groups(rows), target="sex")
    one = pd.DataFrame({"id": ["a", "b"], "dataset": ["ds1", "ds1"], "subject": ["sub-01", "sub-01"]})
    with pytest.raises(ConfigError, match="at least 2 subjects"):
        probe({"pretrained": np.zeros((2, 2))}, pd.Series([1.0, 2.0]), subject_groups(one), target="age")
    with pytest.raises(ConfigError, match="needs numbers"):
        probe(features, pd.Series(["a", "b", "c", "d"]), subject_groups(rows), target="x", kind="continuous")
