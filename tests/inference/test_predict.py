"""Prediction with trained folds, end to end on files: real runs in a real MLflow store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_lab import DataError
from brats_lab.cli import main
from brats_lab.config import load_config, pipeline_path
from brats_lab.data.cases import discover
from brats_lab.inference.predict import load_members, predict_folder, resolve_runs
from brats_lab.io import read_header, read_image
from brats_lab.training.trainer import train_fold

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(copy_phantoms, tiny_network, tmp_path_factory: pytest.TempPathFactory):
    """A project folder with one trained tiny fold of pipeline A: (project, dataset, fold run)."""
    project = tmp_path_factory.mktemp("project")
    dataset = copy_phantoms(project / "phantom")
    cfg = load_config(pipeline_path("A"), "cpu", [
        *tiny_network, "train.epochs=2", "train.swa.enabled=false", f"data.dataset={dataset}",
    ])
    cwd = Path.cwd()
    os.chdir(project)  # the default store is ./mlruns
    try:
        result = train_fold(cfg, 0, progress=False)
    finally:
        os.chdir(cwd)
    return project, dataset, result.run_id


def test_predictions_are_label_maps_in_each_cases_geometry(trained, tmp_path):
    project, dataset, run_id = trained
    cases = discover(dataset)
    members = load_members([run_id], CPU, root=project)
    written, skipped, failures = predict_folder(cases, members, tmp_path, CPU, probabilities=True, progress=False)
    assert failures == [] and skipped == [] and len(written) == len(cases)
    for case, path in zip(cases, written):
        geometry, pixel = read_header(path)
        assert geometry == case.geometry and pixel == "8-bit unsigned integer"
        assert set(np.unique(read_image(path)[0]).tolist()) <= {0, 1, 2, 4}
        # What a NIfTI viewer reads (nibabel, not ITK): the same voxel-to-world map as the images.
        import nibabel

        assert np.allclose(nibabel.load(path).affine, nibabel.load(case.images[0]).affine)
        probs, geometry = read_image(tmp_path / "probabilities" / f"{case.id}.nii.gz")
        assert probs.shape == (*case.geometry.shape, 3) and 0 <= probs.min() and probs.max() <= 1

    # A rerun skips what is there; --overwrite redoes it.
    again = predict_folder(cases, members, tmp_path, CPU, progress=False)
    assert again[0] == [] and again[1] == [c.id for c in cases]
    assert len(predict_folder(cases, members, tmp_path, CPU, overwrite=True, progress=False)[0]) == len(cases)


def test_an_arm_stands_for_its_folds_and_bad_ids_are_named(trained):
    project, _, run_id = trained
    from brats_lab import tracking

    arm = tracking.get_run(run_id, root=project).parent_id
    assert resolve_runs([arm], root=project) == [run_id]
    assert resolve_runs([run_id, arm], root=project) == [run_id]  # the same fold once
    with pytest.raises(DataError, match="run nope: not found"):
        resolve_runs(["nope"], root=project)


def test_tta_prediction_runs_all_views(trained, tmp_path):
    project, dataset, run_id = trained
    cases = discover(dataset)[:1]
    members = load_members([run_id], CPU, root=project)
    plain = predict_folder(cases, members, tmp_path / "plain", CPU, probabilities=True, progress=False)[0]
    tta = predict_folder(cases, members, tmp_path / "tta", CPU, tta=True, probabilities=True, progress=False)[0]
    a = read_image(tmp_path / "plain" / "probabilities" / f"{cases[0].id}.nii.gz")[0]
    b = read_image(tmp_path / "tta" / "probabilities" / f"{cases[0].id}.nii.gz")[0]
    assert plain and tta and not np.allclose(a, b)  # the views really are different inputs


def test_cli_names_a_failing_case_and_goes_on(trained, tmp_path, monkeypatch, capsys):
    project, dataset, run_id = trained
    data = tmp_path / "data"
    shutil.copytree(dataset, data, ignore=shutil.ignore_patterns(".brats-lab-cache"))
    bad = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (bad / f"{bad.name}_t1.nii.gz").write_bytes(b"broken")
    monkeypatch.chdir(project)
    assert main(["predict", "--run", run_id, "--input", str(data), "--output", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert f"{bad.name}_t1.nii.gz" in captured.err and "wrote 3 label maps" in captured.out
