"""predict.py without training: hand-built networks whose outputs are known, tiny untrained models
saved as fold runs in a real MLflow store, and the pure functions (run score, top-k,
the ensemble record, old configs). Fast enough for the mutation run of the module (each of its
mutants runs these; tests/inference/test_predict*.py train folds and check the same end to end)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_lab import DataError, tracking
from brats_lab.config import ExperimentConfig, load_config, pipeline_path
from brats_lab.data.cases import discover
from brats_lab.data.preprocess import preprocess_case
from brats_lab.inference.predict import (
    ENSEMBLE_RECORD,
    Member,
    legacy_config,
    load_members,
    predict_case,
    predict_folder,
    predict_probabilities,
    resolve_runs,
    run_score,
    select_top,
    write_ensemble_record,
)
from brats_lab.io import read_header, read_image
from brats_lab.models import build_model
from brats_lab.precision import autocast_dtype
from brats_lab.run_files import FINAL_MODEL
from brats_lab.training.checkpoint import model_state, save

CPU = torch.device("cpu")
REGIONS = ("ET", "TC", "WT")


# --- run_score, legacy_config: pure functions ----------------------------------


def test_run_score_is_the_mean_over_regions_or_one_region() -> None:
    metrics = {}
    for i, metric in enumerate(("dice", "hd95", "sensitivity", "specificity")):
        # ET, TC, WT = 0.2, 0.4, 0.9 (+ i): mean 0.5 + i, and no region equals the mean.
        metrics |= {f"final_{metric}_ET": 0.2 + i, f"final_{metric}_TC": 0.4 + i, f"final_{metric}_WT": 0.9 + i}
    for i, metric in enumerate(("dice", "hd95", "sensitivity", "specificity")):
        assert run_score(metrics, metric) == pytest.approx(0.5 + i, abs=1e-12)
    assert run_score(metrics, "dice_TC") == 0.4
    assert run_score(metrics, "hd95_WT") == 1.9


def test_run_score_names_every_missing_metric() -> None:
    message = ("no validation metric final_sensitivity_ET, final_sensitivity_WT "
               "(is `--by sensitivity` a metric of brats-lab's fold runs?)")
    with pytest.raises(DataError, match=re.escape(message) + "$"):
        run_score({"final_sensitivity_TC": 0.5}, "sensitivity")
    with pytest.raises(DataError, match=re.escape("no validation metric final_dice_XX (is `--by dice_XX`")):
        run_score({"final_dice_ET": 0.5}, "dice_XX")


def test_legacy_config_renames_the_cbam_papers_gate_and_drops_the_key() -> None:
    old = {"model": {"name": "att_equiunet_tiny", "cbam_spatial_relu": False, "width": 4}, "train": {"epochs": 3}}
    new = legacy_config(old)
    assert new == {"model": {"name": "att_equiunet_woo_tiny", "width": 4}, "train": {"epochs": 3}}
    assert old["model"] == {"name": "att_equiunet_tiny", "cbam_spatial_relu": False, "width": 4}  # not modified
    # true was the authors' CBAM: the name stays; the key goes.
    assert legacy_config({"model": {"name": "att_equiunet", "cbam_spatial_relu": True}}) == {"model": {"name": "att_equiunet"}}
    # Already the gate, or no attention at all: only the key goes.
    for name in ("att_equiunet_woo", "att_equiunet_woo_tiny", "equiunet", "unet_att_equiunet"):
        assert legacy_config({"model": {"name": name, "cbam_spatial_relu": False}}) == {"model": {"name": name}}
    assert legacy_config({"model": {"cbam_spatial_relu": False}}) == {"model": {}}  # no name: the default's
    for today in ({"model": {"name": "att_equiunet"}}, {"train": {}}, {}):
        assert legacy_config(today) is today


# --- write_ensemble_record ----------------------------------------------------------------------


def _members(*run_ids: str) -> list[Member]:
    return [Member(r, ExperimentConfig(), torch.nn.Identity()) for r in run_ids]


def test_the_ensemble_record_names_the_models_and_is_kept_on_a_rerun(tmp_path: Path) -> None:
    selection = {"top": 1, "by": "dice", "folds": {}}
    write_ensemble_record(tmp_path, _members("r1", "r2"), selection, True, "fp16")
    path = tmp_path / ENSEMBLE_RECORD
    expected = {"members": ["r1", "r2"], "tta": True, "precision": "fp16", "small_et": 0, "selection": selection}
    assert path.read_text() == json.dumps(expected, indent=1) + "\n"
    # The same ensemble again: the record already says it, so the file is not rewritten.
    path.write_text(json.dumps(expected))
    write_ensemble_record(tmp_path, _members("r1", "r2"), selection, True, "fp16")
    assert path.read_text() == json.dumps(expected)
    # The same models with other options, and no label map made yet: the record is rewritten with them.
    write_ensemble_record(tmp_path, _members("r1", "r2"), None, False, "fp32", small_et=30)
    assert json.loads(path.read_text()) == {"members": ["r1", "r2"], "tta": False, "precision": "fp32", "small_et": 30,
                                            "selection": None}


def test_the_ensemble_record_refuses_other_settings_over_maps_made_with_its_own(tmp_path: Path) -> None:
    """Maps made without TTA in fp32: a rerun with TTA in bf16 would skip them and write a record
    of settings they were not made with (issue 27 item 9). Refused, the record left as it was;
    --overwrite (which remakes every map) rewrites it. A record older than small_et counts as 0."""
    path = tmp_path / ENSEMBLE_RECORD
    path.write_text(json.dumps({"members": ["r1"], "tta": False, "precision": "fp32", "selection": None}))
    (tmp_path / "BraTS20_Training_001.nii.gz").write_bytes(b"a map")
    old = path.read_text()
    message = (f"{path}: the 1 label map(s) in this folder were made with tta=false, precision=\"fp32\", small_et=0, "
               f"not tta=true, precision=\"bf16\", small_et=0; rerun with those settings, add --overwrite")
    with pytest.raises(DataError, match=re.escape(message)):
        write_ensemble_record(tmp_path, _members("r1"), None, True, "bf16")
    with pytest.raises(DataError, match=re.escape("small_et=0, not tta=false, precision=\"fp32\", small_et=20;")):
        write_ensemble_record(tmp_path, _members("r1"), None, False, "fp32", small_et=20)
    assert path.read_text() == old
    write_ensemble_record(tmp_path, _members("r1"), None, False, "fp32")  # the same settings: fine, and recorded
    assert json.loads(path.read_text())["small_et"] == 0
    write_ensemble_record(tmp_path, _members("r1"), None, True, "bf16", overwrite=True)
    assert json.loads(path.read_text()) == {"members": ["r1"], "tta": True, "precision": "bf16", "small_et": 0, "selection": None}


def test_the_ensemble_record_refuses_a_folder_of_another_ensemble(tmp_path: Path) -> None:
    write_ensemble_record(tmp_path, _members("r1", "r2", "r3"), None, False, "auto")
    message = (f"{tmp_path / ENSEMBLE_RECORD}: this folder holds the label maps of another ensemble (3 other models); "
               "use another --output folder, or delete it first")
    with pytest.raises(DataError, match=re.escape(message) + "$"):
        write_ensemble_record(tmp_path, _members("r1", "r2"), None, False, "auto")
    with pytest.raises(DataError, match=r"another ensemble \(3 other models\)"):
        write_ensemble_record(tmp_path, _members("r2", "r1", "r3"), None, False, "auto")  # order matters: fold by fold
    # A record that is not JSON names no models: refused all the same, and left as it is.
    (tmp_path / ENSEMBLE_RECORD).write_text("{not json")
    with pytest.raises(DataError, match=r"another ensemble \(0 other models\)"):
        write_ensemble_record(tmp_path, _members("r1"), None, False, "auto")
    assert (tmp_path / ENSEMBLE_RECORD).read_text() == "{not json"


# --- a real store, without training ---------------------------------------------------------------

EXPERIMENT = "predict-fast"
SPLIT = {"data.dataset": "data/phantom", "data.folds": "2", "data.seed": "16111990", "data.split": "brats-lab"}


@pytest.fixture
def store(empty_mlflow_store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(empty_mlflow_store, root / "mlruns")
    return root


def _fold(arm: tracking.Run, fold: int, dice: float, hd95: float, params: dict | None = None, status: str = "FINISHED") -> str:
    run = tracking.fold_run(arm, fold, f"{arm.name} fold {fold}")
    run.log_params(params or {**SPLIT, "model.name": arm.name})
    run.log_metrics({f"final_dice_{r}": dice for r in REGIONS} | {f"final_hd95_{r}": hd95 for r in REGIONS}, step=0)
    if status != "RUNNING":
        run.finish(status)
    return run.id


def _arm(root: Path, name: str, params: dict | None = None) -> tracking.Run:
    return tracking.arm_run(EXPERIMENT, f"hash-{name}", name, params or {**SPLIT, "model.name": name}, root=root)


def test_top_k_records_every_candidate_and_chooses_per_fold(store: Path) -> None:
    """Three arms of two folds (Dice, HD95 per fold): the record is written out by hand."""
    scores = {"att": [(0.70, 5.0), (0.60, 9.0)], "full": [(0.80, 7.0), (0.50, 3.0)], "removal": [(0.75, 6.0), (0.65, 4.0)]}
    arms, folds = {}, {}
    for name, per_fold in scores.items():
        arms[name] = _arm(store, name)
        for fold, (dice, hd95) in enumerate(per_fold):
            params = {**SPLIT, "model.name": name} | ({"data.exclude": '["case_1"]'} if name == "removal" else {})
            folds[name, fold] = _fold(arms[name], fold, dice, hd95, params)
    given = [arms["att"].id, folds["full", 0], folds["full", 1], arms["removal"].id]  # arms and fold runs

    def candidate(name: str, fold: int, given_as: str, score: float, rank: int, chosen: bool) -> dict:
        return {"run_id": folds[name, fold], "given_as": given_as, "arm_run_id": arms[name].id, "arm_name": name,
                "model": name, "excluded_cases": '["case_1"]' if name == "removal" else "[]", "score": pytest.approx(score, abs=1e-12),
                "rank": rank, "chosen": chosen}

    chosen, record = select_top(given, 2, "dice", root=store)
    assert chosen == [folds["full", 0], folds["removal", 0], folds["removal", 1], folds["att", 1]]
    assert record == {
        "rule": "per fold, the 2 model(s) with the highest validation dice "
                "(the fold's whole-volume validation of its final model, mean over ET, TC, WT)",
        "top": 2,
        "by": "dice",
        "folds": {
            "0": [candidate("att", 0, arms["att"].id, 0.70, 3, False), candidate("full", 0, folds["full", 0], 0.80, 1, True),
                  candidate("removal", 0, arms["removal"].id, 0.75, 2, True)],
            "1": [candidate("att", 1, arms["att"].id, 0.60, 2, True), candidate("full", 1, folds["full", 1], 0.50, 3, False),
                  candidate("removal", 1, arms["removal"].id, 0.65, 1, True)],
        },
    }
    # HD95 of one region: lower is better; the rule says so, without "mean over".
    chosen, record = select_top(given, 1, "hd95_ET", root=store)
    assert chosen == [folds["att", 0], folds["full", 1]]
    assert record["rule"] == ("per fold, the 1 model(s) with the lowest validation hd95_ET "
                              "(the fold's whole-volume validation of its final model)")
    assert [(c["score"], c["rank"], c["chosen"]) for c in record["folds"]["1"]] == [(9.0, 3, False), (3.0, 1, True), (4.0, 2, False)]


def test_top_k_keeps_the_lowest_of_every_lower_is_better_metric_and_refuses_an_unknown_one(store: Path) -> None:
    """2023 fold runs log lesion-wise HD95, whole-volume HD95 and lesion FP/FN counts: for each,
    the model with the lowest wins and the record says "lowest"; lesion-wise Dice keeps the highest."""
    lower = ("lesion_hd95_WT", "volume_hd95_WT", "lesion_fp_WT", "lesion_fn_WT")
    arms, folds = {}, {}
    for name, worst in (("bad", True), ("good", False)):  # the bad model first: the order given is no help
        arms[name] = _arm(store, name)
        run = tracking.fold_run(arms[name], 0, f"{name} fold 0")
        run.log_params({**SPLIT, "model.name": name})
        run.log_metrics({f"final_{m}": 373.0 if worst else 5.0 for m in lower} | {"final_lesion_dice_WT": 0.1 if worst else 0.9}, step=0)
        run.finish("FINISHED")
        folds[name] = run.id
    given = [arms["bad"].id, arms["good"].id]
    for by in (*lower, "lesion_dice_WT"):
        chosen, record = select_top(given, 1, by, root=store)
        assert chosen == [folds["good"]], by
        word = "highest" if by == "lesion_dice_WT" else "lowest"
        assert record["rule"].startswith(f"per fold, the 1 model(s) with the {word} validation {by} "), by
        assert [(c["arm_name"], c["rank"], c["chosen"]) for c in record["folds"]["0"]] == [("bad", 2, False), ("good", 1, True)], by
    # A misspelt metric is refused before any run is read (the run given here does not exist).
    with pytest.raises(DataError, match=re.escape("unknown metric 'lesion_hd95_wt'") + ".*did you mean 'lesion_hd95_WT'"):
        select_top(["no-such-run"], 1, "lesion_hd95_wt", root=store)


def test_top_k_keeps_the_order_of_the_runs_given_on_a_tie(store: Path) -> None:
    arms = {name: _arm(store, name) for name in ("a", "b", "c")}
    folds = {name: _fold(arm, 0, 0.5 if name != "b" else 0.4, 10.0) for name, arm in arms.items()}
    assert select_top([arms["c"].id, arms["b"].id, arms["a"].id], 1, root=store)[0] == [folds["c"]]
    assert select_top([arms["a"].id, arms["b"].id, arms["c"].id], 1, root=store)[0] == [folds["a"]]
    chosen, record = select_top([arms["b"].id, arms["c"].id, arms["a"].id], 2, "hd95", root=store)
    assert chosen == [folds["b"], folds["c"]]  # all 10.0: the order given
    assert [c["rank"] for c in record["folds"]["0"]] == [1, 2, 3]


def test_top_k_refuses_too_few_candidates_other_cases_and_a_bad_top(store: Path) -> None:
    a, b = _arm(store, "a"), _arm(store, "b")
    other = {**SPLIT, "data.seed": "7", "model.name": "b"}
    run_a, run_b = _fold(a, 0, 0.5, 1.0), _fold(b, 0, 0.6, 1.0, other)
    with pytest.raises(DataError, match=re.escape("fold 0: 1 trained model(s) among the --run given, --top 2 needs 2")):
        select_top([a.id], 2, root=store)
    assert select_top([a.id], 1, root=store)[0] == [run_a]  # exactly `top` candidates are enough
    with pytest.raises(DataError, match=re.escape("--top must be >= 1, got 0")):
        select_top([a.id], 0, root=store)
    # The same run given twice is one candidate: --top 2 does not choose it twice (issue 27 item 9).
    with pytest.raises(DataError, match=re.escape(f"fold 0: 1 trained model(s) among the --run given, --top 2 needs 2 "
                                                  f"(given more than once, counted once: {run_a})")):
        select_top([a.id, a.id], 2, root=store)
    with pytest.raises(DataError, match=re.escape(f"(given more than once, counted once: {run_a})")):
        select_top([run_a, a.id], 2, root=store)  # a fold run and its arm
    chosen, record = select_top([run_a, a.id], 1, root=store)
    assert chosen == [run_a] and [c["given_as"] for c in record["folds"]["0"]] == [run_a]
    described = f"{run_a}: {dict(SPLIT)}; {run_b}: {dict(SPLIT, **{'data.seed': '7'})}"
    with pytest.raises(DataError, match=re.escape(f"fold 0: the candidates were validated on different cases ({described}); "
                                                  "their scores do not compare")):
        select_top([a.id, b.id], 1, root=store)


def test_an_arm_stands_for_its_newest_finished_fold_runs(store: Path) -> None:
    arm = _arm(store, "a")
    old1 = _fold(arm, 1, 0.5, 1.0)
    new1 = _fold(arm, 1, 0.5, 1.0)  # fold 1 trained again: the newest counts
    fold0 = _fold(arm, 0, 0.5, 1.0)
    _fold(arm, 2, 0.5, 1.0, status="FAILED")  # not finished: not a model
    assert resolve_runs([arm.id], root=store) == [fold0, new1]
    assert resolve_runs([old1, arm.id, fold0], root=store) == [old1, fold0, new1]  # each run once, in order
    empty = _arm(store, "empty")
    _fold(empty, 0, 0.5, 1.0, status="RUNNING")
    with pytest.raises(DataError, match=re.escape(f"run {empty.id}: an arm run without finished folds")):
        resolve_runs([empty.id], root=store)
    study = tracking.start_run(EXPERIMENT, "a study", "study", root=store)
    with pytest.raises(DataError, match=re.escape(f"run {study.id}: not a fold or arm run of brats-lab (kind='study')")):
        resolve_runs([study.id], root=store)
    with pytest.raises(DataError, match=r"^run nope: not found in the tracking store \(.*nope.*\)$"):  # MLflow's reason
        resolve_runs(["nope"], root=store)


# --- load_members: tiny untrained models saved as fold runs ---------------------------------------


@pytest.fixture
def saved_model(tiny_network):
    """The function `_saved_model` below, with `tiny_network`'s settings."""
    return lambda *args, **kwargs: _saved_model(tiny_network, *args, **kwargs)


def _saved_model(tiny_network: tuple[str, ...], store: Path, pipeline: str, name: str, fold: int = 0,
                 legacy: bool | None = None) -> tuple[str, torch.nn.Module]:
    """A fold run whose final model is a tiny untrained network of `pipeline` (seeded by fold)."""
    config = load_config(pipeline_path(pipeline), "cpu", [*tiny_network, "model.name=att_equiunet_tiny"])
    torch.manual_seed(fold + 10 * len(name))
    model = build_model(config.model)
    state = model_state(model, config, fold)
    if legacy is not None:  # as saved before att_equiunet became the authors' network
        state["config"]["model"]["cbam_spatial_relu"] = legacy
    arm = _arm(store, name)
    run = tracking.fold_run(arm, fold, f"{name} fold {fold}")
    save(run.artifact_dir() / FINAL_MODEL, state)
    run.finish("FINISHED")
    return run.id, model


def test_members_are_the_saved_models_in_eval_mode(store: Path, saved_model) -> None:
    run_a, model_a = saved_model(store, "A", "a")
    run_b, model_b = saved_model(store, "A", "b", fold=1, legacy=False)
    members = load_members([run_a, run_b], CPU, root=store)
    assert [m.run_id for m in members] == [run_a, run_b]
    assert [m.config.model.name for m in members] == ["att_equiunet_tiny", "att_equiunet_woo_tiny"]  # b: the old gate
    for member, model in zip(members, (model_a, model_b)):
        assert not member.model.training
        saved = model.state_dict()
        loaded = member.model.state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        assert member.config.data.normalization == "minmax"


def test_members_must_preprocess_alike_and_have_a_final_model(store: Path, saved_model) -> None:
    run_a, _ = saved_model(store, "A", "a")
    run_b, _ = saved_model(store, "B", "b")
    message = ("the runs preprocess differently (minmax, zscore): predict each pipeline on its own "
               "and combine the label maps with `brats-lab merge`")
    with pytest.raises(DataError, match=re.escape(message) + "$"):
        load_members([run_b, run_a], CPU, root=store)
    unfinished = tracking.fold_run(_arm(store, "c"), 0, "c fold 0")
    expected = f"run {unfinished.id}: no final model ({FINAL_MODEL}) among its artifacts (did its training finish?)"
    with pytest.raises(DataError, match=re.escape(expected) + "$"):
        load_members([unfinished.id], CPU, root=store)


# --- predict_case, predict_folder: networks whose output is known ---------------------------------


class _Logits(torch.nn.Module):
    """Logits (ET, TC, WT) = scale * (the first three input channels) + shift: probabilities known
    exactly from the preprocessed image, voxel by voxel; plus, with `ramp`, a slope along Z from
    -ramp to +ramp, which a Z flip reverses (so the test-time views differ)."""

    def __init__(self, scale: tuple[float, ...], shift: tuple[float, ...], ramp: tuple[float, ...] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.scale, self.shift, self.ramp = (torch.tensor(v)[None, :, None, None, None] for v in (scale, shift, ramp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.linspace(-1, 1, x.shape[-3])[:, None, None]
        return self.scale * x[:, :3] + self.shift + self.ramp * z


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _painted(probabilities: np.ndarray, et: int) -> np.ndarray:
    """A label map by hand: a region where its probability is above 0.5; ET over NCR (TC) over ED (WT)."""
    p_et, p_tc, p_wt = probabilities > 0.5
    return np.where(p_et, et, np.where(p_tc, 1, np.where(p_wt, 2, 0))).astype(np.uint8)


@pytest.mark.parametrize("layout, et", [("brats2020", 4), ("brats2023", 3)])
def test_a_case_is_the_mean_probability_thresholded_and_pasted_back(tmp_path: Path, case_writer, layout: str, et: int) -> None:
    """Two networks, logits linear in the preprocessed image: the mean of their sigmoids, computed
    here in float64 from `preprocess_case`, inside the brain box and 0 outside; the label map is
    those probabilities painted by hand. Model a alone would paint other labels."""
    case = discover(case_writer(tmp_path / "data", "BraTS-GLI-00001-000" if layout == "brats2023" else "BraTS20_Training_001",
                                size=(30, 26, 20), layout=layout).parent)[0]
    scale_a, shift_a = (8.0, 6.0, 4.0), (-5.0, -3.0, 2.0)
    scale_b, shift_b = (2.0, 4.0, -6.0), (-1.0, -2.0, 1.0)
    members = [Member("a", ExperimentConfig(), _Logits(scale_a, shift_a)), Member("b", ExperimentConfig(), _Logits(scale_b, shift_b))]
    path = predict_case(case, members, tmp_path / "out", CPU, probabilities=True, precision="fp32")
    assert path == tmp_path / "out" / f"{case.id}.nii.gz"

    pre = preprocess_case(case, "minmax")
    x = pre.images[:3].astype(np.float64)
    mean = (_sigmoid(np.multiply(np.array(scale_a)[:, None, None, None], x) + np.array(shift_a)[:, None, None, None])
            + _sigmoid(np.multiply(np.array(scale_b)[:, None, None, None], x) + np.array(shift_b)[:, None, None, None])) / 2
    expected = np.zeros((3, *case.geometry.shape))
    expected[(slice(None), *pre.bbox)] = mean
    probabilities, geometry = read_image(tmp_path / "out" / "probabilities" / f"{case.id}.nii.gz")
    assert geometry == case.geometry and probabilities.dtype == np.float32
    np.testing.assert_allclose(np.moveaxis(probabilities, -1, 0), expected, atol=1e-6)

    labels, geometry = read_image(path)
    assert geometry == case.geometry and read_header(path)[1] == "8-bit unsigned integer"
    np.testing.assert_array_equal(labels, _painted(np.moveaxis(probabilities, -1, 0), et))
    assert set(np.unique(labels).tolist()) == {0, 1, 2, et}  # every label painted somewhere
    alone = read_image(predict_case(case, members[:1], tmp_path / "alone", CPU, precision="fp32"))[0]
    assert not np.array_equal(alone, labels)


def test_a_probability_of_exactly_one_half_is_not_in_the_region(tmp_path: Path, case_writer, constant_logits) -> None:
    """Logit 0 is probability 0.5 exactly: "above 0.5" leaves ET and TC out; WT (0.5 + a little) is in."""
    case = discover(case_writer(tmp_path / "data").parent)[0]
    members = [Member("a", ExperimentConfig(), constant_logits((0.0, 0.0, 1e-6)))]
    labels = read_image(predict_case(case, members, tmp_path / "out", CPU))[0]
    box = preprocess_case(case, "minmax").bbox
    expected = np.zeros(case.geometry.shape, np.uint8)
    expected[box] = 2  # edema only
    np.testing.assert_array_equal(labels, expected)
    assert not (tmp_path / "out" / "probabilities").exists()


def test_small_et_relabels_a_small_et_as_ncr(tmp_path: Path, case_writer, constant_logits) -> None:
    """ET everywhere in the brain box (N voxels): kept with `small_et=N`, NCR/NET with N + 1."""
    case = discover(case_writer(tmp_path / "data").parent)[0]
    members = [Member("a", ExperimentConfig(), constant_logits((3.0, 3.0, 3.0)))]
    box = preprocess_case(case, "minmax").bbox
    n = int(np.prod([s.stop - s.start for s in box]))
    kept = read_image(predict_case(case, members, tmp_path / "kept", CPU, small_et=n))[0]
    relabelled = read_image(predict_case(case, members, tmp_path / "small", CPU, small_et=n + 1))[0]
    assert np.count_nonzero(kept == 4) == n and set(np.unique(kept).tolist()) == {0, 4}
    np.testing.assert_array_equal(relabelled, np.where(kept == 4, 1, kept))


def test_a_folder_skips_what_is_written_names_failures_and_passes_the_options(tmp_path: Path, case_writer) -> None:
    data = tmp_path / "data"
    for i in (1, 2, 3):
        case_writer(data, f"BraTS20_Training_00{i}", size=(20, 18, 24), seed=i)  # a Z crop of 17-24: padded to 24, not 32
    (data / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz").write_bytes(b"broken")
    cases = discover(data)
    # ET and TC certain; WT = sigmoid of a ramp along Z, which the Z-flipped views reverse.
    members = [Member("a", ExperimentConfig(), _Logits((0.0, 0.0, 0.0), (3.0, 3.0, 0.0), ramp=(0.0, 0.0, 2.0)))]
    out = tmp_path / "out"
    written, skipped, failures = predict_folder(cases, members, out, CPU, progress=False)
    ids = [c.id for c in cases]
    assert written == [out / f"{ids[0]}.nii.gz", out / f"{ids[2]}.nii.gz"] and skipped == []
    assert len(failures) == 1 and "BraTS20_Training_002_t1.nii.gz" in failures[0]
    assert not (out / "probabilities").exists()  # only when asked
    # Done cases are skipped; the failed one is tried again.
    written, skipped, failures = predict_folder(cases, members, out, CPU, progress=False)
    assert written == [] and skipped == [ids[0], ids[2]] and len(failures) == 1
    # overwrite, tta, probabilities, small_et and precision reach predict_case.
    before = read_image(out / f"{ids[0]}.nii.gz")[0]
    written, skipped, _ = predict_folder(cases, members, out, CPU, tta=True, probabilities=True, small_et=10**6,
                                         overwrite=True, progress=False, precision="fp32")
    assert len(written) == 2 and skipped == []
    after = read_image(out / f"{ids[0]}.nii.gz")[0]
    assert 4 in before and 4 not in after and 1 in after  # small_et: all ET is now NCR
    # With TTA, half the views flip Z: the mean of sigmoid(r) and sigmoid(-r) is 1/2 everywhere
    # in the box; without, WT is the ramp's sigmoid, from sigmoid(-2) to sigmoid(2).
    box = preprocess_case(cases[0], "minmax").bbox
    wt = read_image(out / "probabilities" / f"{ids[0]}.nii.gz")[0][(*box, 2)]
    np.testing.assert_allclose(wt, 0.5, atol=1e-6)
    assert predict_folder(cases[:1], members, tmp_path / "plain", CPU, probabilities=True, progress=False)[0]
    plain = read_image(tmp_path / "plain" / "probabilities" / f"{ids[0]}.nii.gz")[0][(*box, 2)]
    # The ramp runs over the padded crop: Z padded up to the next multiple of 8 (pipeline A's pad_multiple).
    z = box[0].stop - box[0].start
    ramp = 2 * np.linspace(-1, 1, -(-z // 8) * 8)[:z]
    np.testing.assert_allclose(plain, np.broadcast_to(_sigmoid(ramp)[:, None, None], plain.shape), atol=1e-6)


# --- predict_probabilities: the mean of the members' sigmoids, in the precision asked -------------


def _convolutions(n: int) -> list[Member]:
    """`n` members with 3x3x3 convolutions (seeded): not symmetric, so the test-time views differ."""
    torch.manual_seed(0)
    return [Member(f"m{i}", ExperimentConfig(), torch.nn.Conv3d(4, 3, 3, padding=1).eval()) for i in range(n)]


def _by_hand(members: list[Member], image: np.ndarray, dtype: torch.dtype | None, tta: bool = False) -> np.ndarray:
    from brats_lab.inference.tta import predict_tta

    x = torch.from_numpy(image.astype(np.float32))[None]
    outputs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for m in members:
            outputs.append(predict_tta(m.model, x) if tta else torch.sigmoid(m.model(x).float()))
    return (sum(o.double() for o in outputs) / len(outputs))[0].numpy()


def test_probabilities_are_the_mean_sigmoid_in_the_auto_precision_by_default() -> None:
    """Defaults: no TTA and "auto" precision (float32 on an AVX2 CPU, bf16 on one with AMX); a
    float64 image is read as float32, and the probabilities come back in float32 either way."""
    members, image = _convolutions(2), np.random.default_rng(0).random((4, 8, 8, 8))  # float64
    got = predict_probabilities(members, image, CPU)
    assert got.shape == (3, 8, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, _by_hand(members, image, autocast_dtype("auto", CPU)), rtol=0, atol=1e-6)
    assert not np.allclose(got, _by_hand(members[:1], image, None), atol=1e-3)  # both members count
    assert not np.allclose(got, _by_hand(members, image, None, tta=True), atol=1e-3)  # the views differ


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_probabilities_in_the_precision_asked(precision: str, dtype: torch.dtype) -> None:
    members, image = _convolutions(2), np.random.default_rng(1).random((4, 8, 8, 8)).astype(np.float32)
    got = predict_probabilities(members, image, CPU, precision=precision)
    np.testing.assert_allclose(got, _by_hand(members, image, dtype), rtol=0, atol=1e-6)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert not np.allclose(got, _by_hand(members, image, other), rtol=0, atol=1e-6)
    assert not np.allclose(got, _by_hand(members, image, None), rtol=0, atol=1e-6)


def test_probabilities_with_tta_average_every_members_views() -> None:
    members, image = _convolutions(2), np.random.default_rng(2).random((4, 8, 8, 8)).astype(np.float32)
    got = predict_probabilities(members, image, CPU, tta=True, precision="fp32")
    np.testing.assert_allclose(got, _by_hand(members, image, None, tta=True), rtol=0, atol=1e-6)
