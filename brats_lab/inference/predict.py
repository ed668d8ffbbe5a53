"""Whole-volume prediction with trained fold models: preprocess as in training, crop to the brain,
pad to a multiple of 8, average the probabilities of every model (and, with TTA, of its 16 views),
threshold at 0.5, rebuild the label map and paste it back into the case's original geometry.

`select_top` is the paper's final pipeline-A choice: given several trained configurations (arms),
keep per fold the `top` models with the best validation score of that fold, and ensemble those.
`write_ensemble_record` writes which models were chosen and why to `<output>/ensemble.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from brats_lab import DataError, run_files, tracking
from brats_lab.config import ExperimentConfig, from_dict
from brats_lab.data.cases import Case
from brats_lab.data.preprocess import label_map, pad_to_multiple, paste_back, preprocess_case, unpad
from brats_lab.evaluation.metrics import METRICS, lower_is_better
from brats_lab.files import write_text
from brats_lab.inference.merge import small_et_to_ncr
from brats_lab.inference.tta import predict_tta
from brats_lab.io import write_image
from brats_lab.labels import REGIONS
from brats_lab.models import build_model
from brats_lab.precision import autocast_dtype
from brats_lab.training.checkpoint import MODEL_KEYS, load
from brats_lab.training.step import Compute


ENSEMBLE_RECORD = "ensemble.json"
# The data settings that decide which cases a fold validates on: candidates of one fold must agree.
_SPLIT_PARAMS = ("data.dataset", "data.folds", "data.seed", "data.split")


def run_score(metrics: dict[str, float], by: str) -> float:
    """A fold run's validation score `by`: "dice" (or "hd95", "sensitivity", "specificity") is the
    mean over ET, TC and WT of its final whole-volume validation metric; "dice_ET" etc. one region.
    Raises DataError when the run has not logged it."""
    keys = [f"final_{by}_{r}" for r in REGIONS] if by in METRICS else [f"final_{by}"]
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise DataError(f"no validation metric {', '.join(missing)} (is `--by {by}` a metric of brats-lab's fold runs?)")
    return sum(metrics[k] for k in keys) / len(keys)


def select_top(run_ids: list[str], top: int, by: str = "dice", root: Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """Per fold, the `top` fold runs with the best validation score `by` among the folds of
    `run_ids` (arm runs: all their finished folds; fold runs: themselves).

    Returns (the chosen fold run ids, fold by fold; a record of every candidate, its score and
    whether it was chosen). Best is the metric's declared direction (`metrics.metric_direction`:
    the highest Dice, the lowest HD95, lesion-wise HD95 or false-positive count...). Ties keep the
    order of `run_ids`. A fold run given twice (its id twice, or an arm and one of its folds) is
    one candidate, listed where it was first given. Raises DataError for an unknown metric
    (before any run is read), when a fold has fewer than `top` distinct candidates, or when the
    candidates of a fold were validated on different cases (another dataset, split or seed).
    """
    if top < 1:
        raise DataError(f"--top must be >= 1, got {top}")
    lower = lower_is_better(by)  # and an unknown `by` is refused here, before any run is read
    by_fold: dict[int, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    repeated: list[str] = []
    for given in run_ids:
        for fold_id in resolve_runs([given], root):
            if fold_id in seen:  # the same model twice would take two of the fold's `top` places
                repeated.append(fold_id)
                continue
            seen.add(fold_id)
            run = tracking.get_run(fold_id, root=root)
            arm_id = run.parent_id
            params = run.params
            by_fold.setdefault(int(run.tags.get("fold", -1)), []).append({
                "run_id": fold_id,
                "given_as": given,
                "arm_run_id": arm_id,
                "arm_name": tracking.get_run(arm_id, root=root).name if arm_id else None,
                "model": params.get("model.name"),
                "excluded_cases": params.get("data.exclude", "[]"),
                "score": run_score(run.metrics(), by),
                "_split": {k: params.get(k) for k in _SPLIT_PARAMS},
            })
    chosen: list[str] = []
    folds: dict[str, list[dict[str, Any]]] = {}
    for fold in sorted(by_fold):
        candidates = by_fold[fold]
        if len({json.dumps(c["_split"], sort_keys=True) for c in candidates}) > 1:
            described = "; ".join(f"{c['run_id']}: {c['_split']}" for c in candidates)
            raise DataError(f"fold {fold}: the candidates were validated on different cases ({described}); their scores do not compare")
        if len(candidates) < top:
            twice = [r for r in repeated if r in {c["run_id"] for c in candidates}]
            note = f" (given more than once, counted once: {', '.join(dict.fromkeys(twice))})" if twice else ""
            raise DataError(f"fold {fold}: {len(candidates)} trained model(s) among the --run given, --top {top} needs {top}{note}")
        ranked = sorted(range(len(candidates)), key=lambda i: (candidates[i]["score"] if lower else -candidates[i]["score"], i))
        for rank, i in enumerate(ranked):
            candidates[i]["rank"] = rank + 1
            candidates[i]["chosen"] = rank < top
        for c in candidates:
            del c["_split"]
        chosen += [candidates[i]["run_id"] for i in ranked[:top]]
        folds[str(fold)] = candidates
    record = {
        "rule": f"per fold, the {top} model(s) with the {'lowest' if lower else 'highest'} validation {by} "
                f"(the fold's whole-volume validation of its final model{', mean over ET, TC, WT' if '_' not in by else ''})",
        "top": top,
        "by": by,
        "folds": folds,
    }
    return chosen, record


# The options that change the label maps the same models write; a record older than `small_et`
# was written by a `predict` that never relabelled small ET.
_MAP_SETTINGS: dict[str, Any] = {"tta": False, "precision": "auto", "small_et": 0}


def write_ensemble_record(
    out_dir: Path, members: list["Member"], selection: dict[str, Any] | None, tta: bool, precision: str,
    small_et: int = 0, overwrite: bool = False,
) -> None:
    """`<out_dir>/ensemble.json`: the models of this prediction, the settings its label maps are
    made with (TTA, precision, small-ET threshold) and, with a top-k selection, every candidate of
    every fold, its score, and whether it was chosen.

    Refuses (DataError) a folder whose record names other models (its label maps would mix two
    ensembles), and one whose label maps were made with other settings unless `overwrite` (which
    remakes every map): the maps already there would be skipped, and the record would describe
    settings they were not made with."""
    path = Path(out_dir) / ENSEMBLE_RECORD
    record = {
        "members": [m.run_id for m in members],
        "tta": tta,
        "precision": precision,
        "small_et": small_et,
        "selection": selection,
    }
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("members") != record["members"]:
            raise DataError(
                f"{path}: this folder holds the label maps of another ensemble ({len(old.get('members', []))} other models); "
                "use another --output folder, or delete it first"
            )
        if old == record:
            return  # a rerun of the same ensemble: the record already says it
        before = {k: old.get(k, default) for k, default in _MAP_SETTINGS.items()}
        now = {k: record[k] for k in _MAP_SETTINGS}
        maps = sorted(p.name for p in Path(out_dir).glob("*.nii.gz"))
        if before != now and maps and not overwrite:
            said = lambda settings: ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())  # noqa: E731
            raise DataError(
                f"{path}: the {len(maps)} label map(s) in this folder were made with {said(before)}, not {said(now)}; "
                "rerun with those settings, add --overwrite to remake every map with the new ones, or use another --output folder"
            )
    write_text(path, json.dumps(record, indent=1) + "\n")


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of a model saved before `att_equiunet` became the authors' network, in today's
    keys: `model.cbam_spatial_relu` is gone; true was the authors' CBAM (now `att_equiunet`),
    false the CBAM paper's gate (now `att_equiunet_woo`). Other configs are returned as they are."""
    model = config.get("model", {})
    if "cbam_spatial_relu" not in model:
        return config
    model = dict(model)
    relu = model.pop("cbam_spatial_relu")
    name = model.get("name", "")
    if not relu and name.startswith("att_equiunet") and "_woo" not in name:
        model["name"] = name.replace("att_equiunet", "att_equiunet_woo", 1)
    return {**config, "model": model}


@dataclass
class Member:
    """One trained model of an ensemble."""

    run_id: str
    config: ExperimentConfig
    model: torch.nn.Module


def resolve_runs(run_ids: list[str], root: Path | None = None) -> list[str]:
    """Fold run ids; an arm run id stands for all its finished folds (the newest run of each)."""
    folds: list[str] = []
    for run_id in run_ids:
        try:
            run = tracking.get_run(run_id, root=root)
        except Exception as e:  # MLflow raises its own exception types for unknown ids
            raise DataError(f"run {run_id}: not found in the tracking store ({str(e).splitlines()[0]})") from None
        kind = run.tags.get("kind")
        if kind == "fold":
            folds.append(run.id)
        elif kind == "arm":
            experiment = tracking.client(root).get_experiment(run.experiment_id).name
            children = tracking.find_runs(experiment, {"kind": "fold", "mlflow.parentRunId": run.id}, statuses=("FINISHED",), root=root)
            if not children:
                raise DataError(f"run {run_id}: an arm run without finished folds")
            newest: dict[Any, Any] = {}  # a fold trained twice counts once: its newest run (find_runs is newest first)
            for child in children:
                newest.setdefault(child.tags.get("fold"), child.id)
            folds += [newest[f] for f in sorted(newest)]
        else:
            raise DataError(f"run {run_id}: not a fold or arm run of brats-lab (kind={kind!r})")
    return list(dict.fromkeys(folds))


def load_members(run_ids: list[str], device: torch.device, root: Path | None = None) -> list[Member]:
    """The final models of these fold runs (or arms), in eval mode on `device`."""
    members = []
    for run_id in resolve_runs(run_ids, root):
        run = tracking.get_run(run_id, root=root)
        path = run.artifact(run_files.FINAL_MODEL)
        if path is None:
            raise DataError(f"run {run_id}: no final model ({run_files.FINAL_MODEL}) among its artifacts (did its training finish?)")
        state = load(Path(path), MODEL_KEYS)  # weights_only: no arbitrary unpickling
        config = from_dict(legacy_config(state["config"]), source=str(path))
        model = build_model(config.model)
        model.load_state_dict(state["model"])
        members.append(Member(run_id, config, model.to(device).eval()))
    norms = {m.config.data.normalization for m in members}
    if len(norms) > 1:
        raise DataError(
            f"the runs preprocess differently ({', '.join(sorted(norms))}): predict each pipeline on its own "
            "and combine the label maps with `brats-lab merge`"
        )
    return members


def predict_probabilities(
    members: list[Member], image: np.ndarray, device: torch.device, tta: bool = False, precision: str = "auto"
) -> np.ndarray:
    """Mean sigmoid probabilities (3, z, y, x) of all members for one padded volume (4, z, y, x),
    the networks run under autocast to `precision` (see `autocast_dtype`)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)  # (1, 4, Z, Y, X)
    total = torch.zeros((1, 3, *x.shape[2:]), dtype=torch.float32, device=device)
    compute = Compute(device, autocast_dtype(precision, device))  # probabilities are averaged in float32 all the same
    with torch.no_grad(), compute.autocast():
        for member in members:
            if tta:
                total += predict_tta(member.model, x)
            else:
                total += torch.sigmoid(member.model(x).float())
    return (total / len(members))[0].cpu().numpy()


def predict_case(
    case: Case,
    members: list[Member],
    out_dir: Path,
    device: torch.device,
    tta: bool = False,
    probabilities: bool = False,
    small_et: int = 0,
    precision: str = "auto",
) -> Path:
    """Segment one case and write `<out_dir>/<case id>.nii.gz` (uint8, the case's geometry and
    label convention); with `probabilities`, also `<out_dir>/probabilities/<case id>.nii.gz`
    (float32, three components ET, TC, WT)."""
    config = members[0].config
    pre = preprocess_case(case, config.data.normalization)
    padded, pads = pad_to_multiple(pre.images, config.data.pad_multiple)
    probs = predict_probabilities(members, padded, device, tta, precision)  # (3, Z, Y, X) padded brain crop
    path = Path(out_dir) / f"{case.id}.nii.gz"
    labels = label_map(probs > 0.5, pads, case.convention, pre.bbox, pre.geometry.shape)
    if small_et:
        labels = small_et_to_ncr(labels, case.convention, small_et)
    write_image(labels, pre.geometry, path)
    if probabilities:
        full = paste_back(unpad(probs, pads).astype(np.float32), pre.bbox, pre.geometry.shape)
        write_image(np.moveaxis(full, 0, -1), pre.geometry, Path(out_dir) / "probabilities" / f"{case.id}.nii.gz")
    return path


def predict_folder(
    cases: list[Case],
    members: list[Member],
    out_dir: Path,
    device: torch.device,
    tta: bool = False,
    probabilities: bool = False,
    small_et: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    precision: str = "auto",
) -> tuple[list[Path], list[str], list[str]]:
    """Segment every case: (written, skipped because done, failures by name). A case that fails is
    reported and the others go on; a rerun skips cases already written unless `overwrite`."""
    written, skipped, failures = [], [], []
    for case in tqdm(cases, desc="predicting", unit="case", disable=not progress):
        if not overwrite and (Path(out_dir) / f"{case.id}.nii.gz").is_file():
            skipped.append(case.id)
            continue
        try:
            written.append(predict_case(case, members, out_dir, device, tta, probabilities, small_et, precision))
        except DataError as e:
            failures.append(str(e))
    return written, skipped, failures
