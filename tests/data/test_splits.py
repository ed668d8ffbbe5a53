"""Cross-validation splits: deterministic, complete, disjoint, and tied to the data they were made for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.data.splits import load_splits, make_splits, save_splits

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 24)]  # 23: folds of 5 and 4 cases
HASH = "a" * 64


def test_every_case_in_exactly_one_validation_fold() -> None:
    splits = make_splits(IDS, folds=5, seed=1)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == IDS
    assert sorted(len(s["val"]) for s in splits) == [4, 4, 5, 5, 5]
    for s in splits:
        assert s["train"] == sorted(set(IDS) - set(s["val"]))
        assert s["val"] == sorted(s["val"])


def test_deterministic_and_independent_of_input_order() -> None:
    a = make_splits(IDS, folds=5, seed=16111990)
    assert make_splits(list(reversed(IDS)), folds=5, seed=16111990) == a
    assert make_splits(tuple(IDS), 5, 16111990) == a
    assert make_splits(IDS, folds=5, seed=2) != a
    assert [s["val"] for s in a] != [IDS[i::5] for i in range(5)]  # actually shuffled


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        make_splits(IDS + IDS[:1])
    with pytest.raises(ValueError, match="cannot fill"):
        make_splits(IDS[:3], folds=5)
    with pytest.raises(ValueError, match="at least 2"):
        make_splits(IDS, folds=1)


def test_save_load_round_trip(tmp_path: Path) -> None:
    splits = make_splits(IDS, folds=5, seed=3)
    path = tmp_path / "folds" / "splits.json"
    save_splits(path, splits, HASH, seed=3)
    assert load_splits(path, HASH) == splits
    assert load_splits(path, HASH, case_ids=IDS) == splits
    record = json.loads(path.read_text())
    assert record["manifest_hash"] == HASH and record["seed"] == 3 and record["case_ids"] == IDS
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temporary file left


def test_load_rejects_other_data(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    save_splits(path, make_splits(IDS, folds=5, seed=3), HASH)
    with pytest.raises(DataError, match="manifest hash aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        load_splits(path, "b" * 64)
    with pytest.raises(DataError, match=r"no longer match.*1 cases in no fold.*1 cases gone"):
        load_splits(path, HASH, case_ids=IDS[1:] + ["BraTS20_Training_999"])
    with pytest.raises(DataError, match="no splits file"):
        load_splits(tmp_path / "missing.json", HASH)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_splits(tmp_path / "bad.json", HASH)


def test_load_rejects_inconsistent_folds(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    save_splits(path, make_splits(IDS, folds=5, seed=3), HASH)
    record = json.loads(path.read_text())
    record["splits"][1]["val"].append(record["splits"][0]["val"][0])  # in two validation folds
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match="validation lists of folds 0 and 1"):
        load_splits(path, HASH)
    record = json.loads(path.read_text())
    record["splits"][1]["val"].pop()
    record["splits"][2]["train"].remove(record["splits"][0]["val"][0])  # a case it should train on
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match="fold 2's training cases"):
        load_splits(path, HASH)


@pytest.mark.parametrize("n, folds, seed", [(369, 5, 16111990), (23, 5, 16111990), (40, 2, 16111990), (17, 3, 7)])
def test_authors_split_is_scikit_learns_kfold_over_sorted_folders(tmp_path: Path, n: int, folds: int, seed: int) -> None:
    """`method="authors"` puts the same cases in the same folds as the authors' `get_datasets`:
    case folders sorted by path, then scikit-learn's KFold(shuffle=True, random_state=seed)."""
    from sklearn import model_selection  # the dev extras; not a runtime dependency (missing: fails, not skips)
    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, n + 1)]
    for case in ids:
        (tmp_path / case).mkdir()
    folders = sorted(x for x in tmp_path.iterdir() if x.is_dir())  # as the authors list them
    expected = [
        {"train": sorted(folders[i].name for i in train), "val": sorted(folders[i].name for i in val)}
        for train, val in model_selection.KFold(folds, shuffle=True, random_state=seed).split(folders)
    ]
    shuffled = list(np.random.default_rng(0).permutation(ids))  # the order ids arrive in does not matter
    assert make_splits(shuffled, folds, seed, method="authors") == expected
    assert make_splits(ids, folds, seed, method="authors") != make_splits(ids, folds, seed)  # another algorithm


def test_unknown_split_method() -> None:
    with pytest.raises(ValueError, match="unknown split method 'sklearn'; expected one of brats-lab, authors"):
        make_splits(IDS, method="sklearn")
