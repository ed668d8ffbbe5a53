"""Whole-volume prediction with trained fold models: preprocess as in training, crop to the brain,
pad to a multiple of 16, average the probabilities of every model (and, with TTA, of its 16 views),
threshold at 0.5, rebuild the label map and paste it back into the case's original geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brats_lab import DataError
from brats_lab.config import ExperimentConfig, from_dict
from brats_lab.data.cases import Case
from brats_lab.data.preprocess import BBox, Pads, pad_to_multiple, paste_back, preprocess_case, unpad
from brats_lab.io import Geometry, write_image
from brats_lab.labels import LabelConvention
from brats_lab.models import build_model
from brats_lab.training.checkpoint import FINAL_MODEL, MODEL_KEYS, load


@dataclass
class Member:
    """One trained model of an ensemble."""

    run_id: str
    config: ExperimentConfig
    model: torch.nn.Module


def resolve_runs(run_ids: list[str], root: Path | None = None) -> list[str]:
    """Fold run ids; an arm run id stands for all its finished folds (the newest run of each)."""
    from brats_lab import tracking

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
            newest = {}  # a fold trained twice counts once: its newest run (find_runs is newest first)
            for child in children:
                newest.setdefault(child.tags.get("fold"), child.id)
            folds += [newest[f] for f in sorted(newest)]
        else:
            raise DataError(f"run {run_id}: not a fold or arm run of brats-lab (kind={kind!r})")
    return list(dict.fromkeys(folds))


def load_members(run_ids: list[str], device: torch.device, root: Path | None = None) -> list[Member]:
    """The final models of these fold runs (or arms), in eval mode on `device`."""
    from brats_lab import tracking

    members = []
    for run_id in resolve_runs(run_ids, root):
        run = tracking.get_run(run_id, root=root)
        local = run.artifact_dir()
        path = local / FINAL_MODEL if local is not None else run.download_artifact(FINAL_MODEL, Path.cwd() / "mlruns" / "downloads" / run_id)
        if not Path(path).is_file():
            raise DataError(f"run {run_id}: no final model at {path} (did its training finish?)")
        state = load(Path(path), MODEL_KEYS)  # weights_only: no arbitrary unpickling
        config = from_dict(state["config"], source=str(path))
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


@torch.no_grad()
def predict_probabilities(members: list[Member], image: np.ndarray, device: torch.device, tta: bool = False) -> np.ndarray:
    """Mean sigmoid probabilities (3, z, y, x) of all members for one padded volume (4, z, y, x)."""
    from brats_lab.inference.tta import predict_tta

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)  # (1, 4, Z, Y, X)
    total = torch.zeros((1, 3, *x.shape[2:]), dtype=torch.float32, device=device)
    # bf16 on a GPU (probabilities are averaged in float32 all the same); float32 on CPU.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
) -> Path:
    """Segment one case and write `<out_dir>/<case id>.nii.gz` (uint8, the case's geometry and
    label convention); with `probabilities`, also `<out_dir>/probabilities/<case id>.nii.gz`
    (float32, three components ET, TC, WT)."""
    config = members[0].config
    pre = preprocess_case(case, config.data.normalization)
    padded, pads = pad_to_multiple(pre.images, config.data.pad_multiple)
    probs = predict_probabilities(members, padded, device, tta)  # (3, Z, Y, X) padded brain crop
    path = Path(out_dir) / f"{case.id}.nii.gz"
    write_label_map(probs > 0.5, pads, case.convention, pre.bbox, pre.geometry, path, small_et)
    if probabilities:
        full = paste_back(unpad(probs, pads).astype(np.float32), pre.bbox, pre.geometry.shape)
        write_image(np.moveaxis(full, 0, -1), pre.geometry, Path(out_dir) / "probabilities" / f"{case.id}.nii.gz")
    return path


def write_label_map(
    regions: np.ndarray,
    pads: Pads,
    convention: LabelConvention,
    bbox: BBox,
    geometry: Geometry,
    path: Path,
    small_et: int = 0,
) -> np.ndarray:
    """The label map of region masks predicted on a padded brain crop, in the case's original
    geometry, written to `path` (uint8) and returned (z, y, x).

    `regions` is (3, Z, Y, X) bool, ET, TC, WT, on the crop padded by `pad_to_multiple` with
    `pads`; the crop is unpadded, the labels rebuilt from the regions (`convention.from_regions`),
    pasted back at `bbox` into a volume of `geometry`'s shape, optionally `small_et` applied
    (`merge.small_et_to_ncr`), and written. `predict_case` and the trainer's final scoring
    (`training/scoring.py`) both go this way, so validation scores exactly what `predict` writes.
    """
    labels = paste_back(convention.from_regions(unpad(regions, pads)), bbox, geometry.shape)
    if small_et:
        from brats_lab.inference.merge import small_et_to_ncr

        labels = small_et_to_ncr(labels, convention, small_et)
    labels = labels.astype(np.uint8)
    write_image(labels, geometry, path)
    return labels


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
) -> tuple[list[Path], list[str], list[str]]:
    """Segment every case: (written, skipped because done, failures by name). A case that fails is
    reported and the others go on; a rerun skips cases already written unless `overwrite`."""
    from tqdm import tqdm

    written, skipped, failures = [], [], []
    for case in tqdm(cases, desc="predicting", unit="case", disable=not progress):
        if not overwrite and (Path(out_dir) / f"{case.id}.nii.gz").is_file():
            skipped.append(case.id)
            continue
        try:
            written.append(predict_case(case, members, out_dir, device, tta, probabilities, small_et))
        except DataError as e:
            failures.append(str(e))
    return written, skipped, failures
