"""Shared fixtures: small cases written to disk, never arrays faked in memory."""

from __future__ import annotations

import json

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import tqdm

from brats_lab import run_files, tracking
from brats_lab.data.cases import LAYOUTS
from brats_lab.evaluation.stats import compare_runs
from brats_lab.io import BRATS_ORIGIN, IDENTITY, Geometry, write_image

# tqdm's default lock holds a multiprocessing semaphore, shared with forked children: a runner that
# forks the test process (mutmut) and stops a child while it holds it hangs every later child in
# its first bar. The tests need no lock across processes, nor tqdm's monitor thread.
tqdm.tqdm.set_lock(threading.RLock())
tqdm.tqdm.monitor_interval = 0

TINY_SHAPE = (48, 48, 32)  # (x, y, z) of the phantoms the tests use
# A network and patch small enough for a fold in seconds on two cores; TINY_TRAINING adds a short
# schedule without weight averaging.
TINY_NETWORK = ("model.width=4", "data.patch_size=[32, 32, 32]", "data.folds=2", "train.batch_size=2")
TINY_TRAINING = (*TINY_NETWORK, "train.epochs=2", "train.swa.enabled=false", "train.val_every=1")


class _ConstantLogits(torch.nn.Module):
    """A network whose every voxel gets the same three logits (ET, TC, WT): known probabilities
    (logit 0 is probability 0.5 exactly)."""

    def __init__(self, logits: tuple[float, float, float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[None, :, None, None, None].expand(x.shape[0], 3, *x.shape[2:]).clone()


# The skips CI accepts: where the machine, not the project, decides whether a check can run. With
# BRATS_LAB_STRICT_SKIPS=1 (`.ci/run` sets it) any other skip fails the run, so that a missing dev
# dependency or an import error cannot switch a check off without anyone noticing.
ALLOWED_SKIPS = (
    # tests/test_bad_input.py: a container whose root cannot drop its right to read a chmod 000 file.
    "running as root without CAP_SETPCAP",
    # tests/test_faults.py: a container without CAP_SYS_ADMIN cannot mount the small disk that fills up.
    "cannot mount a small tmpfs to fill a disk for real",
)
_UNLISTED_SKIPS: list[str] = []


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(ALLOWED_SKIPS):
        _UNLISTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)  # with xdist the controller sees every worker's reports too


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)  # a module-level pytest.skip or importorskip


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if _UNLISTED_SKIPS and not hasattr(config, "workerinput"):
        terminalreporter.section("skips not on ALLOWED_SKIPS (tests/conftest.py)")
        for line in _UNLISTED_SKIPS:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    strict = os.environ.get("BRATS_LAB_STRICT_SKIPS") == "1"
    if strict and _UNLISTED_SKIPS and not hasattr(session.config, "workerinput") and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ablation_toml(name: str, description: str, seeds: int, arms: dict[str, tuple[str, ...]]) -> str:
    """A two-fold ablation TOML of pipeline A whose baseline is `equiunet`."""
    rows = "\n".join(f"{arm} = {json.dumps(list(overrides))}" for arm, overrides in arms.items())  # a JSON list is a TOML array
    return f"""
name = "{name}"
description = "{description}"
pipeline = "A"
baseline = "equiunet"
folds = 2
seeds = {seeds}

[arms]
{rows}
"""


def _tiny_ablation(name: str = "tiny-attention", *extra: str, seeds: int = 1) -> str:
    """The TOML of a two-fold ablation of tiny networks, equiunet against att_equiunet, each
    trained with `seeds` seeds; `extra` overrides go to both arms after the tiny ones (e.g.
    "train.epochs=6")."""
    tiny = (*TINY_TRAINING, *extra)
    return _ablation_toml(name, "tiny equiunet against att_equiunet", seeds,
                          {"equiunet": ("model.name=equiunet", *tiny), "att_equiunet": ("model.name=att_equiunet", *tiny)})


def _reseeded_ablation(name: str = "tiny-reseeded", seeds: int = 2) -> str:
    """The ablation of issue 27 (item 4), with tiny networks: the baseline against itself at
    train.seed = the baseline's + 1 (pipeline A's 16111990), each trained with `seeds` seeds."""
    return _ablation_toml(name, "tiny equiunet against itself one training seed later", seeds,
                          {"equiunet": ("model.name=equiunet", *TINY_TRAINING),
                           "reseeded": ("model.name=equiunet", *TINY_TRAINING, "train.seed=16111991")})


def _write_case(
    root: Path,
    case_id: str = "BraTS20_Training_001",
    size: tuple[int, int, int] = (32, 32, 24),
    seed: int = 0,
    layout: str = "brats2020",
    with_seg: bool = True,
) -> Path:
    """A simple, valid case on disk: an ellipsoid 'brain' and a nested tumour. Returns its folder."""
    lay = next(l for l in LAYOUTS if l.name == layout)
    rng = np.random.default_rng(seed)
    geometry = Geometry(size, (1.0, 1.0, 1.0), BRATS_ORIGIN, IDENTITY)
    z, y, x = np.indices(geometry.shape)
    c = np.array(geometry.shape) / 2
    r = ((z - c[0]) / (c[0] * 0.8)) ** 2 + ((y - c[1]) / (c[1] * 0.8)) ** 2 + ((x - c[2]) / (c[2] * 0.8)) ** 2
    brain = r < 1
    t = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - 2) ** 2) ** 0.5
    folder = Path(root) / case_id
    for suffix in lay.suffixes:
        img = np.where(brain, rng.normal(500, 50, geometry.shape), 0).astype(np.int16)
        write_image(img, geometry, folder / f"{case_id}{lay.separator}{suffix}.nii.gz")
    if with_seg:
        et = lay.convention.regions["ET"][0]
        seg = np.zeros(geometry.shape, np.uint8)
        seg[t < 6] = 2
        seg[t < 4] = et
        seg[t < 2] = 1
        write_image(seg, geometry, folder / f"{case_id}{lay.separator}seg.nii.gz")
    return folder


def _assert_same_state(a, b, where: str) -> None:
    """Nested checkpoint content equal: tensors bit for bit (and dtype), the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def simple_dataset(tmp_path: Path) -> Path:
    """Three valid BraTS 2020 cases in tmp_path/data."""
    root = tmp_path / "data"
    for i in range(1, 4):
        _write_case(root, f"BraTS20_Training_{i:03d}", seed=i)
    return root


@pytest.fixture(scope="session")
def empty_mlflow_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow store (`mlruns/`) with its tables made: copy it to a test's project folder.
    MLflow's migrations take seconds, so the empty store is kept in pytest's cache, per MLflow
    version: the mutation run starts a test session for every mutant. Without the cache provider
    (`-p no:cacheprovider`, as some runners use) there is no `config.cache`: it is made once per
    session instead."""
    import mlflow

    from brats_lab import tracking

    cache = getattr(request.config, "cache", None)
    if cache is None:
        root = tmp_path_factory.mktemp("empty-store")
        tracking.client(root)
        return root / "mlruns"
    cached = cache.mkdir(f"empty-mlflow-store-{mlflow.__version__}") / "mlruns"
    if not (cached / "mlflow.db").is_file():
        shutil.rmtree(cached, ignore_errors=True)  # left half-made by a crash
        root = tmp_path_factory.mktemp("empty-store")
        tracking.client(root)
        # Made aside and renamed in one step: two test workers may make it at once.
        made = cached.with_name(f"mlruns-{os.getpid()}")
        shutil.copytree(root / "mlruns", made)
        try:
            os.rename(made, cached)
        except OSError:  # the other worker's is there already
            shutil.rmtree(made)
    return cached


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small phantom cases, generated once per test session. Treat as read-only."""
    from brats_lab.data.phantom import synthesize

    root = tmp_path_factory.mktemp("phantom")
    synthesize(root, cases=4, seed=0, shape=TINY_SHAPE, progress=False)
    return root


@pytest.fixture(scope="session")
def case_writer():
    """The function `write_case(root, case_id, size, seed, layout, with_seg)`: a simple, valid case
    on disk (an ellipsoid 'brain' and a nested tumour), for tests that need cases of their own."""
    return _write_case


@pytest.fixture(scope="session")
def copy_phantoms(phantom_dataset: Path):
    """The function `copy_phantoms(folder)`: a fresh copy of the shared phantoms at `folder`,
    returned. The cache is written inside the dataset folder, so a test that prepares, trains or
    predicts works on a copy; this form serves module-scoped fixtures and copies under another name."""

    def copy(folder: Path) -> Path:
        shutil.copytree(phantom_dataset, folder)
        return folder

    return copy


@pytest.fixture
def phantom_copy(copy_phantoms, tmp_path: Path) -> Path:
    """A fresh copy of the phantoms, at tmp_path/phantom."""
    return copy_phantoms(tmp_path / "phantom")


@pytest.fixture(scope="session", autouse=True)
def no_tracking_uri():
    """MLFLOW_TRACKING_URI unset for the whole run (subprocesses included): every store is then
    mlruns/ in the working folder, whatever the shell running the tests exports. A test that needs a
    URI sets it with monkeypatch."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(scope="session")
def free_port():
    """The function `free_port()`: a TCP port on 127.0.0.1 that nothing listens on now."""
    return _free_port


@pytest.fixture(scope="session")
def tiny_ablation():
    """The function `tiny_ablation(name, *extra, seeds=1)`: the TOML of a two-fold ablation of tiny
    networks, equiunet against att_equiunet, each trained with `seeds` seeds; `extra` overrides go
    to both arms after the tiny ones (e.g. "train.epochs=6")."""
    return _tiny_ablation


@pytest.fixture(scope="session")
def reseeded_ablation():
    """The function `reseeded_ablation(name, seeds)`: the TOML of the baseline against itself one
    training seed later (issue 27, item 4), with tiny networks."""
    return _reseeded_ablation


@pytest.fixture(scope="session")
def constant_logits():
    """The class `ConstantLogits(logits)`: a network whose every voxel gets the same three logits
    (ET, TC, WT), so known probabilities (logit 0 is probability 0.5 exactly)."""
    return _ConstantLogits


@pytest.fixture(scope="session")
def tiny_shape() -> tuple[int, int, int]:
    """(x, y, z) of the phantoms of `phantom_dataset`."""
    return TINY_SHAPE


@pytest.fixture(scope="session")
def tiny_network() -> tuple[str, ...]:
    """Overrides for a network and patch small enough for a fold in seconds on two cores."""
    return TINY_NETWORK


@pytest.fixture(scope="session")
def tiny_training() -> tuple[str, ...]:
    """`tiny_network` and a short schedule (2 epochs, validated each) without weight averaging."""
    return TINY_TRAINING


@pytest.fixture(scope="session")
def assert_same_state():
    """The function `assert_same_state(a, b, where)`: nested checkpoint content equal, tensors bit
    for bit (and dtype), the rest by ==; a failure names the key path under `where`."""
    return _assert_same_state


# The valid inputs of `valid_inputs`: folder -> (layout, its two case ids).
VALID_INPUTS = {"data": ("brats2020", ("BraTS20_Training_001", "BraTS20_Training_002")),
                "data2023": ("brats2023", ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"))}


@pytest.fixture(scope="session")
def valid_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid inputs, built once (treat as read-only: copy what a test breaks): two 2020 cases
    (data/: BraTS20_Training_001 and _002), two 2023 cases (data2023/: BraTS-GLI-00001-000 and
    -00002-000), each `write_case`'s 32x32x24, and their segmentations as perfect predictions
    (pred-data/, pred-data2023/)."""
    home = tmp_path_factory.mktemp("valid")
    for base, (layout, ids) in VALID_INPUTS.items():
        pred = home / f"pred-{base}"
        pred.mkdir()
        sep = "_" if layout == "brats2020" else "-"
        for seed, case in enumerate(ids, start=1):
            _write_case(home / base, case, size=(32, 32, 24), seed=seed, layout=layout)
            shutil.copy(home / base / case / f"{case}{sep}seg.nii.gz", pred / f"{case}.nii.gz")
    return home


def _run_cli(argv: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "brats_lab.cli", *argv], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, **kwargs,
    )


@pytest.fixture(scope="session")
def run_cli():
    """The function `run_cli(argv, cwd, **subprocess_options)`: the real `brats-lab` command with
    `argv`, in a subprocess on one thread, run in `cwd`; its CompletedProcess (text output)."""
    return _run_cli


# --- the review dashboard's store (tests/test_review.py, tests/test_dashboard.py) ----------------


def _review_per_case(offset: float, fold: int) -> pd.DataFrame:
    cases = [f"BraTS20_Training_{fold * 3 + i:03d}" for i in range(1, 4)]
    return pd.DataFrame({
        "case": cases,
        **{f"dice_{r}": [0.9 - offset - 0.3 * i - 0.01 * k for i in range(3)] for k, r in enumerate(("ET", "TC", "WT"))},
        **{f"hd95_{r}": [2.0 + 5 * i for i in range(3)] for r in ("ET", "TC", "WT")},
    })


@pytest.fixture(scope="session")
def review_per_case():
    """The function `review_per_case(offset, fold)`: the per-case table of `review_store`'s fold
    runs (three cases, Dice falling by 0.3 from case to case, `offset` lower)."""
    return _review_per_case


@pytest.fixture(scope="session")
def review_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root whose mlruns/ holds what the review dashboard shows, made with `tracking` as
    the trainer and the ablation make it (no training: small per-case tables logged directly): one
    finished ablation of two arms x two folds, one half-done, an A/A study with seeds and a plain
    training. Read-only."""
    root = tmp_path_factory.mktemp("project")
    study = tracking.start_run("ablation-attention", "attention", "study", {"study": "attention-abc"}, root=root)
    study.log_params({"arms": "baseline,attention", "folds": "2", "baseline": "baseline"})
    for arm_name, chash, offset in (("baseline", "h0", 0.0), ("attention", "h1", 0.05)):
        arm = tracking.arm_run("ablation-attention", chash, arm_name, {"model": arm_name}, parent=study)
        for fold in range(2):
            with tracking.fold_run(arm, fold, f"{arm_name} fold {fold}") as run:
                run.log_table(_review_per_case(offset, fold), run_files.PER_CASE)
        arm.finish()
    study.log_table(pd.DataFrame({  # as compare_arms writes it
        "arm": ["attention"], "metric": ["dice_ET"], "n": [6], "mean_baseline": [0.6], "mean_arm": [0.55],
        "mean_diff": [-0.05], "ci_low": [-0.06], "ci_high": [-0.04], "p_value": [0.03], "p_holm": [0.03],
        "verdict": ["worse (p=0.03)"]}),
                    run_files.COMPARISON)
    study.finish()

    # A second study still going: one fold finished, one running.
    half = tracking.start_run("ablation-norm", "norm", "study", {"study": "norm-def"}, root=root)
    half.log_params({"arms": "baseline,instance", "folds": "1"})
    arm = tracking.arm_run("ablation-norm", "n0", "baseline", {}, parent=half)
    with tracking.fold_run(arm, 0, "baseline fold 0") as run:
        run.log_table(_review_per_case(0.1, 0), run_files.PER_CASE)
    arm2 = tracking.arm_run("ablation-norm", "n1", "instance", {}, parent=half)
    tracking.fold_run(arm2, 0, "instance fold 0")  # left RUNNING, no metrics

    # An A/A study with seeds, as the ablation makes it: one arm run per (arm, seed), tagged.
    aa = tracking.start_run("ablation-seeds", "seeds", "study", {"study": "seeds-xyz"}, root=root)
    aa.log_params({"arms": "equiunet,reseeded", "folds": "2", "seeds": "2", "baseline": "equiunet"})
    frames = []
    for k, arm_name in enumerate(("equiunet", "reseeded")):
        for seed in range(2):
            arm = tracking.arm_run("ablation-seeds", f"s{k}{seed}", arm_name if seed == 0 else f"{arm_name} seed {seed}",
                                   {}, parent=aa)
            arm.set_tags({"arm": arm_name, "seed": seed})
            for fold in range(2):
                table = _review_per_case(0.01 * seed + 0.004 * k * fold, fold)
                with tracking.fold_run(arm, fold, f"{arm_name} seed {seed} fold {fold}") as run:
                    run.log_table(table, run_files.PER_CASE)
                frames.append(table.assign(arm=arm_name, fold=fold, seed=seed))
            arm.finish()
    aa.log_table(compare_runs(pd.concat(frames), "equiunet", ["dice_ET", "dice_TC", "dice_WT"]), run_files.COMPARISON)
    aa.finish()

    training = tracking.arm_run("brats-lab", "t0", "pipeline A", {"pipeline": "A"}, root=root)
    with tracking.fold_run(training, 0, "pipeline A fold 0") as run:
        run.log_table(_review_per_case(0.2, 0), run_files.PER_CASE)
    training.finish()
    return root


@pytest.fixture
def in_review_store(review_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run with the store's project root as the current folder, as `brats-lab dashboard` does."""
    monkeypatch.chdir(review_store)
    return review_store
