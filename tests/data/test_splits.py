"""Cross-validation splits: deterministic, complete, disjoint, and tied to the data they were made for."""

from __future__ import annotations

import dataclasses
import re
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.data.cache import PrepareReport
from brats_lab.data.splits import SPLIT_METHODS, kept_splits, load_splits, make_splits, save_splits, splits_path, training_cases

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


def test_a_fold_trains_on_exactly_the_other_folds_validation_cases() -> None:
    """Not only the count: a fold that trained on its own validation cases (a neighbour's list)
    would have as many cases and pass a count check."""
    for method in SPLIT_METHODS:
        splits = make_splits(IDS, folds=5, seed=3, method=method)
        for fold, split in enumerate(splits):
            others = sorted(c for k, s in enumerate(splits) if k != fold for c in s["val"])
            assert training_cases(splits, fold, [], "data") == others
            excluded = others[::3]  # and a validation case: excluding it changes nothing here
            kept = training_cases(splits, fold, [*excluded, split["val"][0]], "data")
            assert kept == [c for c in others if c not in excluded]


# --------------------------------------------------------------------------------------------
# The folds as training sees them, over many drawn inputs


@dataclasses.dataclass
class PreparedCases:
    """What the trainer's `_fold_data` reads of a prepared cache to split it (no arrays needed)."""

    dir: Path
    case_ids: tuple[str, ...]
    manifest_hash: str = HASH
    report: PrepareReport = dataclasses.field(default_factory=PrepareReport)

    def entry(self, case_id: str) -> SimpleNamespace:
        return SimpleNamespace(has_labels=True)


def test_folds_are_disjoint_complete_and_independent_of_the_training_seed(tmp_path: Path, monkeypatch) -> None:
    """Seeded draws of split method, fold count, case list (ids of any spelling, in any order),
    data.exclude and seeds, through the trainer's own path from config to cases (`_fold_data`):
    no case of a fold's validation set is in its training set, which is exactly the other folds'
    cases less the excluded ones; every case is validated exactly once; and the folds are the same
    for another `train.seed`, whether the splits file is made afresh or read back."""
    from brats_lab.config import load_config, pipeline_path
    from brats_lab.training import trainer

    base = load_config(pipeline_path("A"), "cpu", [])
    rng = np.random.default_rng(20230)
    prepared: dict[str, PreparedCases] = {}
    monkeypatch.setattr(trainer, "prepare", lambda root, method, progress: prepared[str(root)])

    def folds_of(cfg, where: Path, case_ids: tuple[str, ...]) -> list[tuple[list[str] | None, list[str]]]:
        """(training cases or None where training is refused, validation cases) of every fold."""
        prepared[cfg.data.dataset] = PreparedCases(where, case_ids)
        out = []
        for fold in range(cfg.data.folds):
            try:
                _, train, val = trainer._fold_data(cfg, fold, 1, True, False)
            except DataError as e:  # data.exclude names every training case of this fold
                assert "leaves no case to train on" in str(e)
                train, val = None, None
            out.append((train, val))
        # The validation cases of a refused fold, from the splits file the trainer wrote.
        (path,) = where.glob("splits_*.json")
        vals = [s["val"] for s in load_splits(path, HASH, case_ids)]
        return [(train, vals[k] if val is None else val) for k, (train, val) in enumerate(out)]

    refused = 0
    for draw in range(120):
        folds = int(rng.integers(2, 8))
        n = int(rng.integers(folds, 31))
        numbers = rng.choice(1000, size=n, replace=False)
        prefix = str(rng.choice(["BraTS20_Training_", "BraTS-GLI-", "case", "Z_"]))
        case_ids = tuple(f"{prefix}{i:03d}" for i in numbers)  # in drawn, not sorted, order
        exclude = tuple(str(c) for c in rng.choice(case_ids, size=int(rng.integers(0, n)), replace=False))
        data = dataclasses.replace(base.data, dataset=f"draw{draw}", folds=folds, split=str(rng.choice(SPLIT_METHODS)),
                                   seed=int(rng.integers(2**32)), exclude=exclude)
        seeds = rng.choice(2**32, size=2, replace=False)
        cfg, other_seed = (dataclasses.replace(base, data=data, train=dataclasses.replace(base.train, seed=int(s))) for s in seeds)
        where = f"draw {draw}: {data.split}, {folds} folds of {n} cases, {len(exclude)} excluded"

        got = folds_of(cfg, tmp_path / f"{draw}-a", case_ids)
        assert Counter(c for _, val in got for c in val) == Counter(case_ids), f"{where}: not every case validated once"
        sizes = [len(val) for _, val in got]
        assert max(sizes) - min(sizes) <= 1, where
        for fold, (train, val) in enumerate(got):
            expected = sorted(set(case_ids) - set(val) - set(exclude))
            assert train == (expected or None), f"{where}: fold {fold}"  # refused only when nothing is left
            assert not set(train or ()) & set(val), f"{where}: fold {fold} trains on its validation cases"
            refused += train is None
        # Another training seed: the same folds, made afresh and read back from the file.
        assert folds_of(other_seed, tmp_path / f"{draw}-b", case_ids) == got, f"{where}: the folds follow train.seed"
        assert folds_of(other_seed, tmp_path / f"{draw}-a", case_ids) == got, where
    assert refused > 0  # the draws reach an exclude list that empties a fold


def test_kept_splits_are_made_once_per_method_and_read_back_checked(tmp_path):
    from brats_lab.data.splits import kept_splits, splits_path

    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, 11)]
    first = kept_splits(tmp_path, ids, "hash-a", 5, 7, "brats-lab", "d")
    assert splits_path(tmp_path, "brats-lab", 5, 7).name == "splits_5folds_seed7.json"  # the name runs kept before
    assert splits_path(tmp_path, "authors", 5, 7).name == "splits_authors_5folds_seed7.json"
    assert (tmp_path / "splits_5folds_seed7.json").is_file()
    assert kept_splits(tmp_path, ids, "hash-a", 5, 7, "brats-lab", "d") == first  # read back, not made again
    authors = kept_splits(tmp_path, ids, "hash-a", 5, 7, "authors", "d")
    assert (tmp_path / "splits_authors_5folds_seed7.json").is_file() and authors == make_splits(ids, 5, 7, "authors")
    with pytest.raises(DataError, match="manifest"):  # the kept folds of other data are refused
        kept_splits(tmp_path, ids, "hash-b", 5, 7, "brats-lab", "d")
    with pytest.raises(DataError, match="d: 3 cases cannot make 5 folds"):
        kept_splits(tmp_path / "other", ids[:3], "hash-a", 5, 7, "brats-lab", "d")


# --------------------------------------------------------------------------------------------
# What a user reads: the defaults, the file, and every refusal's whole message


def whole(message: str) -> str:
    """A `match` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def test_the_default_folds_are_five_of_the_authors_seed() -> None:
    assert make_splits(IDS) == make_splits(IDS, 5, 16111990, "brats-lab")


def test_duplicate_ids_are_named_each_once() -> None:
    ids = IDS + ["BraTS20_Training_003", "BraTS20_Training_001", "BraTS20_Training_003"]
    with pytest.raises(ValueError, match=whole("duplicate case ids: ['BraTS20_Training_001', 'BraTS20_Training_003']")):
        make_splits(ids)


def test_the_refusals_of_training_cases_name_the_cases() -> None:
    splits = make_splits(IDS[:8], folds=2, seed=1)  # 4 training cases a fold
    with pytest.raises(DataError, match=whole("data.exclude names cases that are not in d: x1, x2")):
        training_cases(splits, 0, ["x2", IDS[0], "x1"], "d")
    train = splits[1]["train"]
    with pytest.raises(DataError, match=whole(
            f"data.exclude leaves no case to train on in fold 1 of d: it lists all 4 of the fold's training cases "
            f"({train[0]}, {train[1]}, {train[2]}, ...); exclude fewer cases")):
        training_cases(splits, 1, train, "d")
    splits = make_splits(IDS[:6], folds=2, seed=1)  # 3: all named, no "..."
    train = splits[0]["train"]
    with pytest.raises(DataError, match=whole(
            f"data.exclude leaves no case to train on in fold 0 of d: it lists all 3 of the fold's training cases "
            f"({train[0]}, {train[1]}, {train[2]}); exclude fewer cases")):
        training_cases(splits, 0, train, "d")


def test_the_file_records_the_fold_count_and_seed_of_kept_splits(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    save_splits(path, make_splits(IDS, folds=4, seed=3), HASH)
    assert json.loads(path.read_text())["folds"] == 4
    kept_splits(tmp_path, IDS, HASH, 3, 7, "authors", "d")
    record = json.loads(splits_path(tmp_path, "authors", 3, 7).read_text())
    assert (record["folds"], record["seed"]) == (3, 7)


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    save_splits(path, make_splits(IDS, folds=5, seed=3), HASH)
    record = json.loads(path.read_text())
    for bad in ({**record, "format_version": 2}, {k: v for k, v in record.items() if k != "splits"}, [record]):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=whole(f"{path}: not a splits file of format version 1")):
            load_splits(path, HASH)


def test_the_refusal_of_other_data_shows_twelve_characters_of_each_hash(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    save_splits(path, make_splits(IDS, folds=5, seed=3), "0123456789abcdef")
    with pytest.raises(DataError, match=whole(
            f"{path}: splits were made for data with manifest hash 0123456789ab, but the data now has fedcba987654 "
            "(cases or preprocessing changed); delete the file to make new splits, knowing that results on old "
            "and new folds do not compare")):
        load_splits(path, "fedcba9876543210")


@pytest.mark.parametrize("gone, new, listed", [
    (6, 6, "['BraTS20_Training_001', 'BraTS20_Training_002', 'BraTS20_Training_003', 'BraTS20_Training_004', "
           "'BraTS20_Training_005']..., 6 cases gone from the data ['n0', 'n1', 'n2', 'n3', 'n4']..."),
    (5, 5, "['BraTS20_Training_001', 'BraTS20_Training_002', 'BraTS20_Training_003', 'BraTS20_Training_004', "
           "'BraTS20_Training_005'], 5 cases gone from the data ['n0', 'n1', 'n2', 'n3', 'n4']"),
])
def test_splits_that_no_longer_match_the_cases_name_five_of_each(tmp_path: Path, gone: int, new: int, listed: str) -> None:
    """The cases of the data that are in no fold, and the cases of the folds gone from the data:
    five of each, and "..." when there are more."""
    new_ids = [f"n{i}" for i in range(new)]
    path = tmp_path / "splits.json"
    save_splits(path, make_splits(IDS[gone:] + new_ids, folds=2, seed=3), HASH)
    with pytest.raises(DataError, match=whole(f"{path}: the splits no longer match the cases: {gone} cases in no fold {listed}")):
        load_splits(path, HASH, case_ids=IDS)
    # kept_splits checks the cases of a kept file too
    kept_splits(tmp_path, IDS[:10], HASH, 2, 3, "brats-lab", "d")
    with pytest.raises(DataError, match="no longer match the cases: 1 cases in no fold"):
        kept_splits(tmp_path, IDS[:11], HASH, 2, 3, "brats-lab", "d")


def test_inconsistent_folds_are_refused_with_the_file_and_the_cases_named(tmp_path: Path) -> None:
    """On saving (where: the path written) and on loading (where: the path read)."""
    path = tmp_path / "splits.json"
    one = make_splits(IDS, folds=5, seed=3)[:1]
    with pytest.raises(DataError, match=whole(f"{path}: need at least 2 folds, got 1")):
        save_splits(path, one, HASH)
    with pytest.raises(DataError, match=whole(f"{path}: fold 1 must have exactly 'train' and 'val', got ['test', 'train', 'val']")):
        save_splits(path, [{"train": ["b"], "val": ["a"]}, {"train": ["a"], "val": ["b"], "test": []}], HASH)
    ids = [f"c{i:02d}" for i in range(14)]
    splits = make_splits(ids, folds=2, seed=3)
    missing = {**splits[0], "train": splits[0]["train"][1:]}
    with pytest.raises(DataError, match=whole(
            f"{path}: fold 0's training cases are not exactly the other folds' validation cases (differ in {splits[0]['train'][:1]})")):
        save_splits(path, [missing, splits[1]], HASH)
    short = {"train": splits[0]["val"][:1], "val": splits[1]["val"]}  # 6 missing: five named
    with pytest.raises(DataError, match=whole(
            f"{path}: fold 1's training cases are not exactly the other folds' validation cases (differ in {splits[0]['val'][1:6]}...)")):
        save_splits(path, [splits[0], short], HASH)
    twice = {**splits[1], "train": splits[1]["train"] + splits[1]["train"][:1]}  # the right cases, one listed twice
    with pytest.raises(DataError, match="fold 1's training cases are not exactly"):
        save_splits(path, [splits[0], twice], HASH)
    save_splits(path, splits, HASH)
    record = json.loads(path.read_text())
    record["splits"][0]["train"] = record["splits"][0]["train"][:2]  # 5 missing: all named
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match=whole(
            f"{path}: fold 0's training cases are not exactly the other folds' validation cases (differ in {splits[0]['train'][2:]})")):
        load_splits(path, HASH)
