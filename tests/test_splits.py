"""Splits: the split column, grouped and stratified hold-out and folds, no patient on two sides."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfm.data.splits import Splits, assign_splits, holdout, leaked_groups, make_splits, split_names
from medfm.errors import ConfigError, ManifestError


def _table(n_patients: int = 60, seed: int = 0, split: bool = False) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A table with 1–4 rows per patient, a per-patient label, and optionally a split column."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_patients)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], sizes)
    labels = np.repeat(rng.permutation(np.arange(n_patients) % 2), sizes)
    table = pd.DataFrame({"patient": patients, "y": labels})
    if split:
        table["split"] = np.repeat(rng.choice(["train", "val", "test"], n_patients, p=[0.6, 0.2, 0.2]), sizes)
    return table, labels, patients


def test_split_column_train_val_test():
    table = pd.DataFrame(
        {
            "y": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
            "split": ["train", "Train", "training", " val ", "validation", "valid", "test", "TEST", "testing", "train"],
        }
    )
    splits = make_splits(table, table["y"].to_numpy())
    np.testing.assert_array_equal(splits.development, [0, 1, 2, 3, 4, 5, 9])
    np.testing.assert_array_equal(splits.test, [6, 7, 8])
    assert len(splits.folds) == 1
    train, val = splits.folds[0]
    np.testing.assert_array_equal(train, [0, 1, 2, 9])
    np.testing.assert_array_equal(val, [3, 4, 5])
    assert "train→val" in splits.how


def test_split_column_with_cv_folds_over_train_and_val():
    table, y, patients = _table(seed=1, split=True)
    splits = make_splits(table, y, cv=3, groups=patients, seed=0)
    names = table["split"].to_numpy()
    np.testing.assert_array_equal(splits.test, np.flatnonzero(names == "test"))
    np.testing.assert_array_equal(splits.development, np.flatnonzero(names != "test"))
    assert len(splits.folds) == 3
    vals = np.sort(np.concatenate([val for _, val in splits.folds]))
    np.testing.assert_array_equal(vals, splits.development)  # every development row validated once
    for train, val in splits.folds:
        assert not set(train) & set(val)
        assert not set(np.concatenate([train, val])) & set(splits.test)
    assert leaked_groups(splits, patients) == set()
    assert "3-fold" in splits.how


def test_unknown_split_value_names_row_and_value():
    table = pd.DataFrame({"y": [0, 1, 0, 1], "split": ["train", "val", "holdout", "test"]})
    with pytest.raises(ManifestError, match=r"row 2.*'holdout'"):
        make_splits(table, table["y"].to_numpy())


def test_split_names_strip_spaces_and_case_and_name_the_manifest_row():
    table = pd.DataFrame({"split": [" val", "TRAIN ", "Testing", "valid"]}, index=[10, 11, 12, 13])
    assert split_names(table, "split").tolist() == ["val", "train", "test", "val"]
    bad = pd.DataFrame({"split": ["train", " val", None, "test"]}, index=[10, 11, 12, 13])
    with pytest.raises(ManifestError, match=r"^row 12: column split is empty; allowed train, val, test$"):
        split_names(bad, "split")
    with pytest.raises(ManifestError, match="split column 'fold' is not in the manifest"):
        split_names(table, "fold")


def test_the_training_commands_parse_the_split_column_as_the_probes_do():
    table = pd.DataFrame({"y": [0, 1, 0, 1], "split": [" train", "Val ", "TEST", "train"]})
    assert assign_splits(table, table["y"].to_numpy(), "split", None, seed=0).tolist() == [
        "train",
        "val",
        "test",
        "train",
    ]
    assert make_splits(table, table["y"].to_numpy(), cv=None).folds[0][1].tolist() == [1]
    table.index = [5, 6, 7, 8]
    table.loc[7, "split"] = "tset"
    with pytest.raises(ManifestError, match=r"^row 7: column split has value 'tset'"):
        assign_splits(table, table["y"].to_numpy(), "split", None, seed=0)


def test_no_test_rows_raises():
    table = pd.DataFrame({"y": [0, 1, 0, 1], "split": ["train", "val", "train", "val"]})
    with pytest.raises(ManifestError, match="no row as test"):
        holdout(table, table["y"].to_numpy())


def test_no_val_rows_without_cv_raises():
    table = pd.DataFrame({"y": [0, 1, 0, 1, 0, 1], "split": ["train"] * 4 + ["test"] * 2})
    with pytest.raises(ManifestError, match="no row as val.*--cv"):
        make_splits(table, table["y"].to_numpy())
    # with --cv the same table works
    table = pd.DataFrame({"y": [0, 1] * 10, "split": ["train"] * 16 + ["test"] * 4})
    splits = make_splits(table, table["y"].to_numpy(), cv=2)
    assert len(splits.folds) == 2


def test_split_column_none_ignores_column():
    table, y, _ = _table(seed=2, split=True)
    splits = make_splits(table, y, split_column=None, seed=0)
    # a stratified hold-out, not the column's test rows
    assert not np.array_equal(splits.test, np.flatnonzero(table["split"].to_numpy() == "test"))
    assert len(splits.folds) == 5


@pytest.mark.parametrize("seed", range(15))
def test_grouped_holdout_and_cv_never_leak(seed):
    table, y, patients = _table(n_patients=50, seed=seed)
    splits = make_splits(table, y, split_column=None, cv=4, groups=patients, seed=seed)
    assert leaked_groups(splits, patients) == set()
    assert len(splits.folds) == 4
    all_rows = np.sort(np.concatenate([splits.development, splits.test]))
    np.testing.assert_array_equal(all_rows, np.arange(len(table)))
    for train, val in splits.folds:
        assert leaked_groups(Splits(train, val), patients) == set()
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), splits.development)


def test_leaked_groups_finds_a_leak():
    table, y, patients = _table(seed=3)
    plain = make_splits(table, y, split_column=None, seed=0)  # not grouped
    assert leaked_groups(plain, patients) != set()  # rows of one patient on both sides
    leaks = leaked_groups(Splits(np.array([0, 1]), np.array([1, 2])), np.array(["a", "b", "c"]))
    assert leaks == {"b"}


@pytest.mark.parametrize("grouped", [False, True])
def test_stratified_folds_keep_both_classes(grouped):
    for seed in range(5):
        table, y, patients = _table(n_patients=40, seed=seed)
        splits = make_splits(table, y, split_column=None, groups=patients if grouped else None, seed=seed)
        assert set(y[splits.test]) == {0, 1}
        for train, val in splits.folds:
            assert set(y[train]) == {0, 1}
            assert set(y[val]) == {0, 1}


@pytest.mark.parametrize("test_size", [0.2, 0.25, 0.5])
def test_holdout_size(test_size):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    table = pd.DataFrame({"y": y})
    development, test = holdout(table, y, split_column="split", test_size=test_size, seed=0)
    assert abs(len(test) / 400 - test_size) < 0.01
    assert len(development) + len(test) == 400
    assert not set(development) & set(test)
    np.testing.assert_array_equal(development, np.sort(development))
    # the class balance of the test rows follows the table's
    assert abs(y[test].mean() - y.mean()) < 0.02


def test_grouped_holdout_size_is_approximate():
    table, y, patients = _table(n_patients=200, seed=4)
    _, test = holdout(table, y, split_column=None, groups=patients, test_size=0.2, seed=0)
    assert 0.15 < len(test) / len(table) < 0.25


def test_holdout_is_seeded():
    table, y, patients = _table(seed=5)
    a = holdout(table, y, split_column=None, groups=patients, seed=1)
    b = holdout(table, y, split_column=None, groups=patients, seed=1)
    c = holdout(table, y, split_column=None, groups=patients, seed=2)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_cv_too_large_for_the_rarest_class_names_cv_and_the_counts():
    # 2 test rows of a split column; 4 development rows of class a, 2 of b: --cv 3 cannot stratify b... nor a.
    table = pd.DataFrame({"split": ["train"] * 4 + ["val"] * 2 + ["test"] * 2})
    y = np.array(["a", "a", "b", "a", "b", "a", "a", "b"])
    with pytest.raises(ConfigError) as info:
        make_splits(table, y, "split", cv=5)
    assert str(info.value) == (
        "--cv 5 over the development rows needs 5 stratified folds, but the 6 rows cannot make them "
        "(rows per class: a: 4, b: 2); give a smaller --cv (the rarest class has 2 rows) or mark val rows in the "
        "split column"
    )


def test_holdout_that_cannot_be_cut_names_test_size_not_cv():
    # The case of the report: the user passed --cv 3, but the default hold-out (1/5) is what fails.
    table = pd.DataFrame({"x": range(8)})
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    with pytest.raises(ConfigError) as info:
        make_splits(table, y, None, cv=3)
    message = str(info.value)
    assert message == (
        "a held-out test set of 1/5 of the rows (--test-size 0.2, no split column) needs 5 stratified folds, but the "
        "8 rows cannot make them (rows per class: 0: 4, 1: 4); mark test rows in a split column or give a larger "
        "--test-size"
    )
    assert "n_splits" not in message and "--cv" not in message


def test_grouped_folds_that_cannot_be_cut_count_the_groups():
    table = pd.DataFrame({"x": range(12)})
    y = np.array([0, 1] * 6)
    groups = np.repeat(["p1", "p2", "p3"], 4)
    with pytest.raises(ConfigError, match=r"needs 5 stratified folds of whole groups, but the 12 rows in 3 groups"):
        make_splits(table, y, None, cv=2, groups=groups)


def test_cli_probe_with_too_few_rows_for_cv_is_one_line(tmp_path, capsys):
    from medfm.cli import main

    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(12, 3)), columns=["feat_0", "feat_1", "feat_2"])
    table["y"] = [0, 1] * 6
    table["split"] = ["train"] * 4 + ["val"] * 2 + ["test"] * 6
    path = tmp_path / "f.csv"
    table.to_csv(path, index=False)
    assert main(["probe", str(path), "--label", "y", "--cv", "4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "medfm: error: --cv 4 over the development rows needs 4 stratified folds, but the 6 rows cannot make them "
        "(rows per class: 0: 3, 1: 3); give a smaller --cv (the rarest class has 3 rows) or mark val rows in the "
        "split column"
    ]


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5, -0.2])
def test_test_size_outside_zero_one_is_refused(test_size):
    # 1.5 used to become a 1/2 hold-out without a word
    table = pd.DataFrame({"x": range(20)})
    with pytest.raises(ConfigError, match=rf"^--test-size {test_size:g}: the held-out share must lie between 0 and 1"):
        holdout(table, np.array([0, 1] * 10), None, test_size=test_size)


def test_cv_of_one_fold_is_refused():
    table = pd.DataFrame({"x": range(20)})
    with pytest.raises(ConfigError, match=r"^--cv 1: a search by folds needs at least 2 folds$"):
        make_splits(table, np.array([0, 1] * 10), None, cv=1)
