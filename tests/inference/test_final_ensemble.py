"""The paper's final ensemble: per fold the two best of three pipeline-A models (`predict --top`),
pipeline B's folds, then the merge; the README's recipe run end to end on tiny phantoms."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brats_lab import DataError, tracking
from brats_lab.cli import main
from brats_lab.data.cases import discover
from brats_lab.inference.predict import ENSEMBLE_RECORD, load_members, predict_folder, select_top
from brats_lab.io import read_image

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

REGIONS = ("ET", "TC", "WT")
SPLIT = {"data.dataset": "data/phantom", "data.folds": "2", "data.seed": "16111990", "data.split": "brats-lab"}


def _store_with_scores(root: Path, scores: dict[str, list[float]], hd95: dict[str, list[float]] | None = None) -> dict[str, str]:
    """Finished arm and fold runs in a real MLflow store under `root`, each fold run with the final
    validation metrics the trainer logs: arm name -> arm run id. `scores[arm][fold]` is the Dice
    of every region of that fold."""
    arms = {}
    for name, per_fold in scores.items():
        arm = tracking.arm_run("ensemble-test", f"hash-{name}", name, {**SPLIT, "model.name": name}, root=root)
        for fold, dice in enumerate(per_fold):
            run = tracking.fold_run(arm, fold, f"{name} fold {fold}")
            run.log_params({**SPLIT, "model.name": name})
            metrics = {f"final_dice_{r}": dice for r in REGIONS}
            metrics |= {f"final_hd95_{r}": (hd95 or {}).get(name, [10.0] * len(per_fold))[fold] for r in REGIONS}
            run.log_metrics(metrics, step=0)
            run.finish("FINISHED")
        arm.finish("FINISHED")
        arms[name] = arm.id
    return arms


def test_top_k_chooses_per_fold_by_the_folds_validation_score(tmp_path: Path) -> None:
    arms = _store_with_scores(
        tmp_path,
        {"att": [0.70, 0.60], "full": [0.80, 0.50], "removal": [0.75, 0.65]},
        hd95={"att": [5.0, 9.0], "full": [7.0, 3.0], "removal": [6.0, 4.0]},
    )
    given = [arms["att"], arms["full"], arms["removal"]]
    chosen, record = select_top(given, 2, "dice", root=tmp_path)

    def fold_run_of(arm: str, fold: int) -> str:
        return next(r for r in tracking.find_runs("ensemble-test", {"kind": "fold", "fold": fold}, root=tmp_path)
                    if r.parent_id == arms[arm])

    expected = [fold_run_of("full", 0).id, fold_run_of("removal", 0).id, fold_run_of("removal", 1).id, fold_run_of("att", 1).id]
    assert chosen == expected
    fold0 = {c["arm_name"]: (c["score"], c["rank"], c["chosen"]) for c in record["folds"]["0"]}
    assert fold0 == {"full": (pytest.approx(0.80), 1, True), "removal": (pytest.approx(0.75), 2, True), "att": (pytest.approx(0.70), 3, False)}
    assert record["top"] == 2 and "highest validation dice" in record["rule"]

    # HD95: lower is better.
    chosen, record = select_top(given, 1, "hd95", root=tmp_path)
    assert chosen == [fold_run_of("att", 0).id, fold_run_of("full", 1).id]
    assert "lowest validation hd95" in record["rule"]

    with pytest.raises(DataError, match=r"fold 0: 3 trained model\(s\) among the --run given, --top 4 needs 4"):
        select_top(given, 4, root=tmp_path)
    with pytest.raises(DataError, match="no validation metric final_sensitivity_ET"):
        select_top(given, 2, "sensitivity", root=tmp_path)


def test_top_k_refuses_candidates_validated_on_other_cases(tmp_path: Path) -> None:
    arms = _store_with_scores(tmp_path, {"a": [0.5, 0.5], "b": [0.6, 0.6]})
    other = tracking.arm_run("ensemble-test", "hash-c", "c", {**SPLIT, "data.split": "authors"}, root=tmp_path)
    for fold in (0, 1):
        run = tracking.fold_run(other, fold, f"c fold {fold}")
        run.log_params({**SPLIT, "data.split": "authors"})
        run.log_metrics({f"final_dice_{r}": 0.9 for r in REGIONS}, step=0)
        run.finish("FINISHED")
    with pytest.raises(DataError, match="fold 0: the candidates were validated on different cases"):
        select_top([arms["a"], arms["b"], other.id], 2, root=tmp_path)


def _arm_of(output: str) -> str:
    return re.search(r"under arm run (\w+)", output).group(1)


@pytest.mark.slow
def test_the_papers_final_ensemble_end_to_end(phantom_copy: Path, tiny_training, tmp_path: Path, monkeypatch, capsys) -> None:
    """README, "The paper's final ensemble": three pipeline-A configurations and pipeline B, two
    folds each; predict A with the two best per fold, B with its folds, merge."""
    data = phantom_copy
    monkeypatch.chdir(tmp_path)  # the default store: ./mlruns
    cases = discover(data)
    tiny = [x for s in (*tiny_training, "train.epochs=1") for x in ("--set", s)]
    configs = {
        "attention": ("A", ["--set", "model.name=att_equiunet"]),
        "full": ("A", []),
        "removal": ("A", ["--set", f'data.exclude=["{cases[0].id}"]']),
        "B": ("B", []),
    }
    arms = {}
    for name, (pipeline, extra) in configs.items():
        for fold in (0, 1):
            assert main(["train", "--pipeline", pipeline, "--fold", str(fold), "--profile", "cpu", "--data", str(data), *tiny, *extra]) == 0
            arms[name] = _arm_of(capsys.readouterr().out)

    a_runs = [x for name in ("attention", "full", "removal") for x in ("--run", arms[name])]
    assert main(["predict", *a_runs, "--top", "2", "--by", "dice", "--input", str(data), "--output", "pred/A"]) == 0
    assert main(["predict", "--run", arms["B"], "--input", str(data), "--output", "pred/B", "--precision", "fp32"]) == 0
    assert main(["merge", "--a", "pred/A", "--b", "pred/B", "--output", "pred/final"]) == 0
    out = capsys.readouterr().out
    assert "4 model(s): wrote 4 label maps to pred/A" in out and "2 model(s): wrote 4 label maps to pred/B" in out

    # The record: every candidate of every fold, its score from the fold's own validation table,
    # the two best chosen (ties keep the order of --run).
    record = json.loads(Path("pred/A", ENSEMBLE_RECORD).read_text())
    expected_members = []
    for fold in ("0", "1"):
        candidates = record["selection"]["folds"][fold]
        assert [c["given_as"] for c in candidates] == [arms["attention"], arms["full"], arms["removal"]]
        scores = []
        for c in candidates:
            table = pd.read_csv(tracking.get_run(c["run_id"]).artifact_dir() / "per_case_metrics.csv")
            scores.append(float(np.mean([table[f"dice_{r}"].mean() for r in REGIONS])))
            assert c["score"] == pytest.approx(scores[-1], abs=1e-9)
        best = sorted(range(3), key=lambda i: (-scores[i], i))[:2]
        assert [c["chosen"] for c in candidates] == [i in best for i in range(3)]
        expected_members += [candidates[i]["run_id"] for i in best]
    assert record["members"] == expected_members and record["selection"]["by"] == "dice"

    # pred/A is the ensemble of exactly the chosen models.
    cpu = torch.device("cpu")
    predict_folder(cases, load_members(expected_members, cpu), tmp_path / "again", cpu, progress=False)
    for case in cases:
        assert np.array_equal(read_image(Path("pred/A", f"{case.id}.nii.gz"))[0], read_image(tmp_path / "again" / f"{case.id}.nii.gz")[0])
        merged, geometry = read_image(Path("pred/final", f"{case.id}.nii.gz"))
        assert geometry == case.geometry and set(np.unique(merged).tolist()) <= {0, 1, 2, 4}

    # Another ensemble into the same folder is refused: its label maps would mix two ensembles.
    assert main(["predict", "--run", arms["full"], "--input", str(data), "--output", "pred/A"]) == 1
    assert "holds the label maps of another ensemble" in capsys.readouterr().err


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_ensemble_averages_probabilities_thresholds_at_half_and_rebuilds_labels(tmp_path: Path, case_writer, constant_logits) -> None:
    """Two models: ET 0.3 and 0.6 (mean 0.45: off), TC 0.4 and 0.7 (0.55: on), WT 0.9 and 0.9.
    A model alone would say ET; the mean of probabilities says NCR/NET (TC and not ET) in the
    whole padded brain crop, and background outside it."""
    from brats_lab.config import ExperimentConfig
    from brats_lab.data.preprocess import brain_bbox, preprocess_case
    from brats_lab.inference.predict import Member, predict_case

    case = discover(case_writer(tmp_path / "data").parent)[0]
    cpu = torch.device("cpu")
    members = [
        Member("a", ExperimentConfig(), constant_logits((_logit(0.3), _logit(0.4), _logit(0.9)))),
        Member("b", ExperimentConfig(), constant_logits((_logit(0.6), _logit(0.7), _logit(0.9)))),
    ]
    labels = read_image(predict_case(case, members, tmp_path / "out", cpu, precision="fp32"))[0]
    box = preprocess_case(case, "minmax").bbox
    expected = np.zeros(case.geometry.shape, np.uint8)
    expected[box] = 1
    assert np.array_equal(labels, expected)
    alone = read_image(predict_case(case, members[1:], tmp_path / "alone", cpu, precision="fp32"))[0]
    assert set(np.unique(alone[box]).tolist()) == {4}  # model b alone: ET (0.6 > 0.5)


def test_models_saved_before_the_authors_cbam_load_as_what_they_were() -> None:
    from brats_lab.config import from_dict
    from brats_lab.inference.predict import legacy_config

    old = {"model": {"name": "att_equiunet_tiny", "cbam_spatial_relu": False}}
    assert from_dict(legacy_config(old)).model.name == "att_equiunet_woo_tiny"  # the CBAM paper's gate
    assert from_dict(legacy_config({"model": {"name": "att_equiunet", "cbam_spatial_relu": True}})).model.name == "att_equiunet"
    assert from_dict(legacy_config({"model": {"name": "equiunet", "cbam_spatial_relu": False}})).model.name == "equiunet"
    today = {"model": {"name": "att_equiunet"}}
    assert legacy_config(today) is today
