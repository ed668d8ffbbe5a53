"""Cross-validation splits: deterministic, stored as JSON beside the data manifest they were made for.

`make_splits` sorts the case ids, shuffles them with a seeded numpy Generator and cuts the result
into `folds` validation folds of sizes differing by at most one (as scikit-learn's KFold); fold k
trains on every other case. The same ids, folds and seed give the same splits on any machine,
whatever order the ids came in, so pipelines A and B (two caches of the same cases) share folds.

`method="authors"` (`data.split = "authors"`) gives the authors' folds instead (open_brats2020,
`src/dataset/brats.py`, `get_datasets`): the case folders sorted by path, then scikit-learn's
`KFold(folds, shuffle=True, random_state=seed)`, i.e. the indices 0..n-1 shuffled in place by
`np.random.RandomState(seed).shuffle`, cut into contiguous folds, the first `n % folds` of them
one case larger. Reimplemented here so scikit-learn is no runtime dependency; the tests compare
it with scikit-learn's own KFold. With the same case list and seed 16111990, fold k is the
authors' fold k.

The JSON file records the cache's manifest hash: `load_splits` refuses a file made for other data
(a different hash) or whose case lists are inconsistent, rather than silently training on a fold
whose validation cases leaked into training.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from brats_lab import DataError
from brats_lab.files import write_text

FORMAT_VERSION = 1
Split = dict[str, list[str]]  # {"train": [...], "val": [...]}, each sorted
SPLIT_METHODS: tuple[str, ...] = ("brats-lab", "authors")


def make_splits(case_ids: Iterable[str], folds: int = 5, seed: int = 16111990, method: str = "brats-lab") -> list[Split]:
    """`folds` splits of `case_ids`: every case is in exactly one `val` list; `train` is the rest.

    `method` "brats-lab" (a numpy Generator permutation) or "authors" (the authors' KFold, see the
    module docstring). Deterministic in (the set of ids, folds, seed, method). Lists are sorted.
    Raises ValueError on duplicate ids, fewer than 2 folds, fewer cases than folds, or an unknown
    method.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate case ids: {dupes}")
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(ids) < folds:
        raise ValueError(f"{len(ids)} cases cannot fill {folds} validation folds")
    if method == "brats-lab":
        chunks = np.array_split(np.random.default_rng(seed).permutation(len(ids)), folds)
    elif method == "authors":
        chunks = authors_folds(len(ids), folds, seed)
    else:
        raise ValueError(f"unknown split method {method!r}; expected one of {', '.join(SPLIT_METHODS)}")
    out = []
    for chunk in chunks:
        val = sorted(ids[i] for i in chunk)
        held = set(val)
        out.append({"train": [i for i in ids if i not in held], "val": val})
    return out


def authors_folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """The validation indices of each fold of scikit-learn's `KFold(folds, shuffle=True,
    random_state=seed)` over `n` items, without scikit-learn: the legacy `RandomState` shuffle
    of 0..n-1, cut into contiguous folds of `n // folds`, the first `n % folds` one larger."""
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(folds, n // folds, dtype=int)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [indices[bounds[k] : bounds[k + 1]] for k in range(folds)]


def training_cases(splits: Sequence[Split], fold: int, exclude: Iterable[str], dataset: str) -> list[str]:
    """Fold `fold`'s training cases without the `exclude`d ones (data.exclude, patient removal).

    Raises DataError when `exclude` names a case that is not in the splits (a typo would
    otherwise exclude nothing), and when it leaves no case to train on: a run on 0 cases ends
    with a NaN loss and nothing learnt.
    """
    known = {c for s in splits for c in s["val"]}
    if unknown := sorted(set(exclude) - known):
        raise DataError(f"data.exclude names cases that are not in {dataset}: {', '.join(unknown)}")
    train = splits[fold]["train"]
    kept = [c for c in train if c not in set(exclude)]
    if not kept:
        raise DataError(f"data.exclude leaves no case to train on in fold {fold} of {dataset}: it lists "
                        f"all {len(train)} of the fold's training cases ({', '.join(train[:3])}"
                        f"{', ...' if len(train) > 3 else ''}); exclude fewer cases")
    return kept


def save_splits(path: Path | str, splits: Sequence[Split], manifest_hash: str, seed: int | None = None) -> None:
    """Write `splits` as JSON (atomically) with the manifest hash of the data they were made for.

    `seed` is recorded for the reader's benefit only.
    """
    _check(splits, str(path))
    record = {
        "format_version": FORMAT_VERSION,
        "manifest_hash": manifest_hash,
        "folds": len(splits),
        "seed": seed,
        "case_ids": sorted(c for s in splits for c in s["val"]),
        "splits": [{"train": sorted(s["train"]), "val": sorted(s["val"])} for s in splits],
    }
    write_text(Path(path), json.dumps(record, indent=1) + "\n")


def load_splits(
    path: Path | str, expected_manifest_hash: str, case_ids: Iterable[str] | None = None
) -> list[Split]:
    """Read splits written by `save_splits`; raise DataError if they do not fit the data.

    Checks: the file exists and parses; its manifest hash is `expected_manifest_hash` (the cache's
    `manifest_hash`); every case is in exactly one validation fold and each fold trains on all the
    others; and, if `case_ids` is given (e.g. `cache.case_ids`), that the splits cover exactly those.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no splits file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable splits file ({e})") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION or "splits" not in record:
        raise DataError(f"{path}: not a splits file of format version {FORMAT_VERSION}")
    if record.get("manifest_hash") != expected_manifest_hash:
        raise DataError(
            f"{path}: splits were made for data with manifest hash {str(record.get('manifest_hash'))[:12]}, "
            f"but the data now has {expected_manifest_hash[:12]} (cases or preprocessing changed); "
            f"delete the file to make new splits, knowing that results on old and new folds do not compare"
        )
    splits = record["splits"]
    _check(splits, str(path))
    if case_ids is not None:
        have, want = {c for s in splits for c in s["val"]}, set(case_ids)
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise DataError(
                f"{path}: the splits no longer match the cases: {len(missing)} cases in no fold "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(extra)} cases gone from the data "
                f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
    return [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]


def splits_path(folder: Path | str, method: str, folds: int, seed: int) -> Path:
    """Where the folds of a dataset are kept (beside its cache): one file per method, fold count and seed."""
    prefix = "" if method == "brats-lab" else f"{method}_"  # the first method's files kept their old name
    return Path(folder) / f"splits_{prefix}{folds}folds_seed{seed}.json"


def kept_splits(folder: Path | str, case_ids: Sequence[str], manifest_hash: str, folds: int, seed: int,
                method: str, dataset: str) -> list[Split]:
    """The folds of this data, made once and kept in `folder` so every run uses the same: read
    back (and checked against the data) if kept, else made and kept."""
    path = splits_path(folder, method, folds, seed)
    if path.is_file():
        return load_splits(path, manifest_hash, case_ids)
    if len(case_ids) < folds:
        raise DataError(f"{dataset}: {len(case_ids)} cases cannot make {folds} folds")
    splits = make_splits(case_ids, folds, seed, method)
    save_splits(path, splits, manifest_hash, seed)
    return splits


def _check(splits: Sequence[Split], where: str) -> None:
    """Every case in exactly one val fold; each fold's train is exactly the other folds' val."""
    if len(splits) < 2:
        raise DataError(f"{where}: need at least 2 folds, got {len(splits)}")
    seen: dict[str, int] = {}
    for k, split in enumerate(splits):
        if set(split) != {"train", "val"}:
            raise DataError(f"{where}: fold {k} must have exactly 'train' and 'val', got {sorted(split)}")
        for case in split["val"]:
            if case in seen:
                raise DataError(f"{where}: case {case} is in the validation lists of folds {seen[case]} and {k}")
            seen[case] = k
    every = set(seen)
    for k, split in enumerate(splits):
        expected = every - set(split["val"])
        if set(split["train"]) != expected or len(split["train"]) != len(expected):
            wrong = sorted(set(split["train"]) ^ expected)
            raise DataError(
                f"{where}: fold {k}'s training cases are not exactly the other folds' validation cases "
                f"(differ in {wrong[:5]}{'...' if len(wrong) > 5 else ''})"
            )
