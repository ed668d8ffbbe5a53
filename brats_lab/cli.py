"""The `brats-lab` command. Each command imports what it needs when it runs, so `--help` is instant
(only modules that cost nothing to import, standard library underneath, are imported here)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from brats_lab import DataError, UserError, __version__, run_files
from brats_lab.config import load_config, pipeline_path
from brats_lab.precision import PRECISIONS
from brats_lab.serve import run_foreground
from brats_lab.urls import safe_url

DEFAULT_PHANTOM = Path("data/phantom")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    previous = _stop_on_sigterm()
    try:
        return args.run(args) or 0
    except UserError as e:  # DataError, ConfigError, TrainingDiverged: the user's to fix
        _error(*str(e).splitlines())  # a multi-line message (prepare's failed cases): one error each
        return 1
    except OSError as e:  # a write that failed (disk full, permissions); the message names the file
        print(f"brats-lab: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("brats-lab: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("brats-lab: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _usage(parser: argparse.ArgumentParser) -> int:
    """A command group run without its subcommand: its help, exit status 2."""
    parser.print_help()
    return 2


def _error(*lines: str) -> None:
    for line in lines:
        print(f"brats-lab: error: {line}", file=sys.stderr)


def _seed_option(option: str, value: int) -> None:
    if not 0 <= value < 2**32:  # what numpy's and torch's seeding accept
        raise DataError(f"{option} must be between 0 and 2**32 - 1, got {value}")


def _port_option(port: int) -> None:
    if not 1 <= port <= 65535:
        raise DataError(f"--port must be between 1 and 65535, got {port}")


def _cases_named(cases: list[str], most: int = 10) -> str:
    return ", ".join(cases[:most]) + (f" and {len(cases) - most} more" if len(cases) > most else "")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, a job scheduler) raised where the command is, so it stops the
    way Ctrl-C stops it: runs marked KILLED, trials failed, temporary files removed."""


def _stop_on_sigterm():
    """Turn SIGTERM into `Terminated`; returns the handler it replaced (None off the main thread,
    where signals cannot be handled)."""
    def terminate(signum, frame):
        if isinstance(sys.exc_info()[1], KeyboardInterrupt):
            return  # already stopping (Ctrl-C, an earlier SIGTERM): let the clean-up finish
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the meaningless ones (None, False, or on required options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The `brats-lab` parser: each command's options are added by its own `_<command>_parser` below,
    in the order `--help` lists them; each handler `_<command>` follows further down."""
    parser = argparse.ArgumentParser(
        prog="brats-lab",
        description="Reproduce and take apart a top-10 BraTS 2020 solution: data, evaluation, "
        "training, ablations and review.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"brats-lab {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _data_parser(commands)
    _baseline_parser(commands)
    _train_parser(commands)
    _predict_parser(commands)
    _merge_parser(commands)
    _ablate_parser(commands)
    _worker_parser(commands)
    _evaluate_parser(commands)
    _ui_parser(commands)
    _dashboard_parser(commands)
    return parser


def _data_parser(commands: argparse._SubParsersAction) -> None:
    data = _command(commands, "data", "make, check and prepare datasets", "Make, check and prepare BraTS datasets.")
    data_commands = data.add_subparsers(title="data commands", metavar="DATA_COMMAND")
    data.set_defaults(run=lambda a: _usage(data))
    _synth_parser(data_commands)
    _check_parser(data_commands)
    _prepare_parser(data_commands)


def _synth_parser(data_commands: argparse._SubParsersAction) -> None:
    synth = _command(
        data_commands,
        "synth",
        "write phantom cases in the BraTS 2020 (or 2023) layout",
        "Write phantom brain-tumour cases in the BraTS 2020 (or, with --layout 2023, 2023+) on-disk layout (four modalities and a "
        "segmentation per case, NIfTI), built on the MNI152 anatomy shipped with nilearn. The same "
        "seed gives the same bytes. A phantom.json beside the cases records how each was made.",
    )
    synth.add_argument("--out", type=Path, default=DEFAULT_PHANTOM, help="folder to write the cases into")
    synth.add_argument("--cases", type=int, default=40, help="number of cases")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument(
        "--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=(240, 240, 155),
        help="voxels per axis; the field of view stays 240 x 240 x 155 mm, so a smaller shape is coarser",
    )
    synth.add_argument("--no-et-fraction", type=float, default=0.2, help="share of cases without enhancing tumour (lower-grade-glioma-like)")
    synth.add_argument("--corrupt-fraction", type=float, default=0.0, help="share of cases whose labels are deliberately corrupted (recorded in phantom.json)")
    synth.add_argument(
        "--layout", choices=("2020", "2023"), default="2020",
        help="on-disk layout and labels: 2020 (BraTS20_Training_001, t1/t1ce/t2/flair, labels 1/2/4) or 2023 "
        "(BraTS-GLI-00001-000, t1n/t1c/t2w/t2f, labels 1/2/3; half the cases with satellite lesions)",
    )
    synth.set_defaults(run=_synth)


def _check_parser(data_commands: argparse._SubParsersAction) -> None:
    check = _command(
        data_commands,
        "check",
        "validate every case of a dataset",
        "Validate every case of a BraTS dataset (2020, 2021 or 2023+ layout, auto-detected) and "
        "report every problem at once, one line each, naming case and file: missing or unreadable "
        "files, truncated gzip, not NIfTI, not 3-D, modalities that disagree in geometry, NaN or "
        "infinite voxels, all-zero modalities, labels the release does not allow, a segmentation "
        "whose geometry differs from the images, two files for one modality, a case folder that "
        "cannot be listed (permissions, a symbolic link loop). Case folders of two layouts in one "
        "folder are refused outright. Exit status 0 when clean, 1 otherwise.",
    )
    check.add_argument("dataset", type=Path, help="dataset folder (the one holding the case folders, or its parent)")
    check.set_defaults(run=_check)


def _prepare_parser(data_commands: argparse._SubParsersAction) -> None:
    prepare = _command(
        data_commands,
        "prepare",
        "cache preprocessed cases for training",
        "Preprocess every case (normalise, crop to the brain) into a cache of memory-mappable arrays "
        "with a manifest of content hashes, so training never decodes NIfTI. Cases whose inputs or "
        "settings are unchanged are reused; stale or corrupt entries are rebuilt.",
    )
    prepare.add_argument("dataset", type=Path, help="dataset folder")
    prepare.add_argument(
        "--pipeline", choices=("A", "B"), default="A",
        help="A: clip to the 1st/99th percentile of brain voxels, min-max to [0, 1]; B: z-score over brain voxels",
    )
    prepare.add_argument("--out", type=Path, default=None, help="cache folder (default: inside the dataset folder)")
    prepare.set_defaults(run=_prepare)


def _baseline_parser(commands: argparse._SubParsersAction) -> None:
    baseline = _command(
        commands,
        "baseline",
        "segment with intensity thresholds (no training)",
        "Segment every case with a non-learned intensity-threshold rule (FLAIR-bright -> whole "
        "tumour, T1ce-bright -> enhancing tumour, what the rim encloses -> tumour core): the floor "
        "any trained model must beat. Writes <case id>.nii.gz label maps in each case's original "
        "geometry; a case that fails is reported by name and the others go on.",
    )
    baseline.add_argument("--input", type=Path, required=True, help="dataset folder")
    baseline.add_argument("--output", type=Path, required=True, help="folder for the label maps")
    baseline.set_defaults(run=_baseline)


def _train_parser(commands: argparse._SubParsersAction) -> None:
    train = _command(
        commands,
        "train",
        "train one fold of pipeline A or B",
        "Train one cross-validation fold of pipeline A (min-max, GroupNorm, Ranger, SWA) or B "
        "(z-score, InstanceNorm, Adam), then validate it on the fold's held-out cases with the "
        "BraTS metrics. Everything is logged to MLflow (mlruns/ by default; MLFLOW_TRACKING_URI "
        "overrides it). A checkpoint is written every epoch; --resume continues an interrupted run "
        "exactly where it stopped.",
    )
    train.add_argument("--pipeline", choices=("A", "B"), required=True, help="the paper's pipeline")
    train.add_argument("--fold", type=int, default=0, help="which fold to train (0-based)")
    train.add_argument(
        "--profile", default=None,
        help="cpu (minutes on 2 cores) or paper (the published setting), or a TOML file; default: paper with a GPU, cpu without",
    )
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=3e-4 --set model.name=att_equiunet (repeatable)")
    train.add_argument("--data", type=Path, default=None, help="dataset folder (default: the config's data.dataset, data/phantom)")
    train.add_argument("--resume", action="store_true", help="continue the newest unfinished run of this configuration and fold")
    train.set_defaults(run=_train)


def _predict_parser(commands: argparse._SubParsersAction) -> None:
    predict = _command(
        commands,
        "predict",
        "segment cases with trained folds (ensemble, TTA)",
        "Segment every case of a dataset folder with the final models of trained runs: each --run "
        "is a fold run id or an arm run id (all its finished folds). Probabilities are averaged over "
        "the models (and, with --tta, over the paper's 16 flips and axial rotations, each inverted "
        "exactly), thresholded at 0.5 and turned into a label map (ET, NCR/NET, ED) in each case's "
        "original geometry, one <case id>.nii.gz each, uint8. Cases already written are skipped "
        "unless --overwrite; a case that fails is reported by name and the others go on.",
    )
    predict.add_argument("--run", dest="runs", action="append", required=True, metavar="RUN", help="a fold or arm run id (repeatable)")
    predict.add_argument("--input", type=Path, required=True, help="dataset folder")
    predict.add_argument("--output", type=Path, required=True, help="folder for the label maps")
    predict.add_argument("--tta", action="store_true", help="average the 16 test-time views of the paper")
    predict.add_argument("--probabilities", action="store_true", help="also write probabilities/<case id>.nii.gz (ET, TC, WT; float32)")
    predict.add_argument("--small-et", type=int, default=0, metavar="VOXELS",
                         help="relabel a predicted ET smaller than this as NCR/NET (0: never)")
    predict.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists again")
    predict.add_argument("--top", type=int, metavar="K",
                         help="per fold, keep only the K models with the best validation score among the --run given "
                              "(the paper's final pipeline A: three arms, --top 2); the choice is written to OUTPUT/ensemble.json")
    predict.add_argument("--by", default=None, metavar="METRIC",
                         help="the validation score of --top (default: dice): dice, hd95, sensitivity, specificity (mean over ET, TC, WT) "
                              "or one region, e.g. dice_ET, lesion_hd95_WT; HD95 and lesion false positives/negatives: lowest is best")
    predict.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="autocast dtype of the networks; auto: bf16 on a GPU, on a CPU bf16 only where it executes "
                              "bf16 natively (AMX, AVX512-BF16), float32 otherwise (the paper: fp16)")
    predict.set_defaults(run=_predict)


def _merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = _command(
        commands,
        "merge",
        "merge the label maps of pipelines A and B (the paper's second pass)",
        "Merge two folders of label maps as the paper did: keep A's enhancing tumour and NCR/NET; "
        "where A says background and B says edema, take edema; where A says edema and B says "
        "background, take background. Both must hold the same cases in the same geometry.",
    )
    merge.add_argument("--a", type=Path, required=True, help="label maps of pipeline A")
    merge.add_argument("--b", type=Path, required=True, help="label maps of pipeline B")
    merge.add_argument("--output", type=Path, required=True, help="folder for the merged label maps")
    merge.add_argument("--labels", choices=("brats2020", "brats2023"), default="brats2020", help="the label convention of the maps")
    merge.set_defaults(run=_merge)


def _ablate_parser(commands: argparse._SubParsersAction) -> None:
    ablate = _command(
        commands,
        "ablate",
        "run an ablation study (arms x folds) and say whether the difference is real",
        "Train every arm of an ablation on the same folds (one Optuna trial per arm and fold, "
        "tracked in MLflow as study -> arms -> folds), then print the paper's Table 3 layout (Dice "
        "and HD95 per region, mean (std) over the runs), the noise floor (the seed-to-seed SD of a "
        "run's mean) and, for each arm against the baseline, the mean paired difference with a t-test "
        "that takes the training run as the unit (fold means of the paired run differences), "
        "Holm-corrected across regions, and the smallest difference the design can detect. "
        "--plan sizes a study without training. With no options it works on a fresh machine: it "
        "writes the phantom dataset if there is none and uses the embedded stores under mlruns/. "
        "Rerunning the same command reuses everything already done.",
    )
    ablate.add_argument("ablation", help="attention, norm, patient-removal, or a TOML file like experiments/ablations/attention.toml")
    ablate.add_argument("--profile", default=None, help="cpu or paper; default: paper with a GPU, cpu without")
    ablate.add_argument("--folds", type=int, default=None, help="run the first K folds (default: the ablation's, fewer for cpu)")
    ablate.add_argument("--seeds", type=int, default=None, help="train every (arm, fold) with K seeds (default: the ablation's)")
    ablate.add_argument("--plan", action="store_true", help="train nothing: print the minimum detectable effect of folds x seeds designs")
    ablate.add_argument("--noise", type=float, default=None, help="with --plan: the noise floor to assume (default: the one measured in the store)")
    ablate.add_argument("--data", type=Path, default=None, help=f"dataset folder (default: {DEFAULT_PHANTOM}, written if missing)")
    ablate.add_argument("--workers", type=int, default=None,
                        help="worker processes on this machine sharing the study (default: with the cpu profile one per "
                             "core, each on one thread, which trains more runs per hour than one process on every core; "
                             "else 1); with --slurm, array tasks (default: slurm.workers)")
    ablate.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///mlruns/optuna.db; postgresql://... to share)")
    ablate.add_argument("--slurm", action="store_true",
                        help="run the workers as a SLURM job array (settings: the [slurm] table of the profile, then of the ablation, then --slurm-set); "
                        "waits for them and prints the report")
    ablate.add_argument("--slurm-set", dest="slurm_set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --slurm: partition, account, workers, gpus_per_worker, cpus_per_worker, mem, time, signal_delay, "
                        "or sbatch.OPTION for any other sbatch option, e.g. --slurm-set partition=gpu --slurm-set sbatch.qos=high (repeatable)")
    ablate.add_argument("--detach", action="store_true", help="with --slurm: submit and return; the same command again waits, --report prints the report")
    ablate.add_argument("--report", action="store_true", help="train nothing: print the study's report if its runs are done, else how far it is")
    ablate.set_defaults(run=_ablate)


def _worker_parser(commands: argparse._SubParsersAction) -> None:
    worker = _command(
        commands,
        "worker",
        "join a running ablation study as one more worker",
        "Claim and train the waiting (arm, fold) trials of a study until none is left. Run it on "
        "another machine with the same --storage (PostgreSQL) and MLFLOW_TRACKING_URI (a shared "
        "MLflow server) as the launcher.",
    )
    worker.add_argument("--study", required=True, help="the study name `brats-lab ablate` printed")
    worker.add_argument("--storage", required=True, help="the study's Optuna storage URL")
    worker.add_argument("--quiet", action="store_true", help="no progress bars")
    worker.set_defaults(run=_worker)


def _evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = _command(
        commands,
        "evaluate",
        "score label maps with the BraTS metrics (2020, and lesion-wise for 2023+ data)",
        "Score predicted label maps against a dataset's segmentations with the BraTS 2020 rules: "
        "Dice, sensitivity, specificity and HD95 (mm) for ET, TC and WT; on 2023+ data (labels "
        "1/2/3) also the lesion-wise Dice and HD95, lesion counts and whole-volume Dice and HD95 "
        "of the organisers' brats-evaluation package (--rules to choose others). Writes one row per case "
        "and prints a summary. A missing prediction, or one with another geometry, is reported by "
        "name and scored as a miss (exit status 1).",
    )
    evaluate.add_argument("--pred", type=Path, required=True, help="folder of predictions, <case id>.nii.gz each")
    evaluate.add_argument("--gt", type=Path, required=True, help="dataset folder with the ground-truth segmentations")
    evaluate.add_argument("--out", type=Path, default=None, help="per-case CSV (default: <pred>/metrics.csv)")
    evaluate.add_argument(
        "--rules", default=None, metavar="RULES",
        help="lesion-wise rules: brats2020 (none), gli, mets, men-pre, men-rt, goat, ped (brats-evaluation's "
        "configs), brats2023-gli, -ssa, -men, -ped, -met (the 2023 challenge scorer's); default: from the "
        "dataset's labels (2020/2021: brats2020, 2023+: gli)",
    )
    evaluate.set_defaults(run=_evaluate)


def _ui_parser(commands: argparse._SubParsersAction) -> None:
    ui = _command(
        commands,
        "ui",
        "browse runs in the MLflow UI",
        "Start the MLflow UI on the project's store (mlruns/ in the current folder, or "
        "MLFLOW_TRACKING_URI) and print its address and, per experiment, a link that opens its runs "
        "in the model-training view (MLflow opens a bare experiment on its GenAI pages); studies, "
        "arms and folds show nested, with their metrics, tables and pictures. Runs in the "
        "foreground until Ctrl-C.",
    )
    ui.add_argument("--port", type=int, default=5000, help="port to listen on")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind; the default keeps the UI to this machine")
    ui.set_defaults(run=_ui)


def _dashboard_parser(commands: argparse._SubParsersAction) -> None:
    dashboard = _command(
        commands,
        "dashboard",
        "review studies, compare arms and look at the worst cases",
        "Start the review dashboard (Streamlit) on the project's store (mlruns/ in the current "
        "folder, or MLFLOW_TRACKING_URI): every study and training with its progress, arms "
        "compared over folds with the verdict, the worst cases in a slice viewer. It only reads the store. "
        "Runs in the foreground until Ctrl-C.",
    )
    dashboard.add_argument("--port", type=int, default=8501, help="port to listen on")
    dashboard.add_argument("--host", default="127.0.0.1", help="interface to bind; the default keeps the dashboard to this machine")
    dashboard.set_defaults(run=_dashboard)


def _command(subparsers, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=_HelpFormatter
    )


def _synth(args: argparse.Namespace) -> int:
    from brats_lab.data.phantom import synthesize

    if args.cases < 1:
        raise DataError(f"--cases must be at least 1, got {args.cases}")
    _seed_option("--seed", args.seed)
    if min(args.shape) < 16:
        raise DataError(f"--shape must be at least 16 voxels per axis, got {tuple(args.shape)}")
    for name in ("no_et_fraction", "corrupt_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            raise DataError(f"--{name.replace('_', '-')} must be between 0 and 1")
    folders = synthesize(
        args.out, cases=args.cases, seed=args.seed, shape=tuple(args.shape),
        no_et_fraction=args.no_et_fraction, corrupt_fraction=args.corrupt_fraction,
        layout=f"brats{args.layout}",
    )
    print(f"wrote {len(folders)} phantom cases to {args.out} (details: {args.out / 'phantom.json'})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from brats_lab.data.check import check_dataset

    cases, problems = check_dataset(args.dataset)
    for case in cases:
        for note in case.notes:
            print(f"{case.id}: note: {note}")
    for problem in problems:
        print(problem)
    layout = cases[0].layout.name if cases else "?"
    bad = len({p.case for p in problems})
    print(f"{len(cases)} cases ({layout} layout): {bad} with problems, {len(problems)} problems in all")
    if problems:  # the report above is the product; this line says it failed, and where
        _error(f"{len(problems)} problems in {bad} of {len(cases)} cases (listed above): "
               + _cases_named(list(dict.fromkeys(p.case for p in problems))))
    return 1 if problems else 0


def _prepare(args: argparse.Namespace) -> int:
    from brats_lab.data.cache import prepare

    method = {"A": "minmax", "B": "zscore"}[args.pipeline]
    cache = prepare(args.dataset, method, cache_dir=args.out)
    print(cache.report.summary())
    print(f"cache: {cache.dir} (manifest hash {cache.manifest_hash[:12]})")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from brats_lab.data.cases import discover
    from brats_lab.inference.baseline import predict_folder

    written, failures = predict_folder(discover(args.input), args.output)
    for failure in failures:
        _error(failure)
    print(f"wrote {len(written)} label maps to {args.output}" + (f"; {len(failures)} cases failed" if failures else ""))
    return 1 if failures else 0


def _train(args: argparse.Namespace) -> int:
    profile = args.profile or _default_profile()
    overrides = list(args.overrides) + ([f"data.dataset={args.data}"] if args.data else [])
    cfg = load_config(pipeline_path(args.pipeline), profile, overrides)
    if not 0 <= args.fold < cfg.data.folds:
        raise DataError(f"--fold must be between 0 and {cfg.data.folds - 1} (data.folds = {cfg.data.folds}), got {args.fold}")
    if not Path(cfg.data.dataset).is_dir():
        raise DataError(f"{cfg.data.dataset}: no dataset there; write phantoms with `brats-lab data synth --out {cfg.data.dataset}` or pass --data DIR")

    from brats_lab.training.distributed import process_group
    from brats_lab.training.trainer import train_fold

    with process_group():  # under torchrun: one process of several sharing each batch
        result = train_fold(cfg, args.fold, resume=args.resume)
    if result is None:
        return 0  # not rank 0, which reports
    means = result.mean("dice")
    print(f"fold {args.fold} of pipeline {args.pipeline}: mean Dice " + ", ".join(f"{r} {v:.3f}" for r, v in means.items())
          + f" over {len(result.per_case)} validation cases")
    print(f"MLflow fold run {result.run_id} under arm run {result.arm_id}; browse them with `brats-lab ui`, "
          f"predict with all trained folds of this configuration with `brats-lab predict --run {result.arm_id} ...`")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import torch

    from brats_lab.data.cases import discover
    from brats_lab.inference.predict import load_members, predict_folder, select_top, write_ensemble_record

    if args.by is not None and args.top is None:
        raise DataError(f"--by {args.by} goes with --top K (it ranks the models --top keeps); without --top every --run is used")
    args.by = args.by or "dice"
    if args.small_et < 0:
        raise DataError(f"--small-et must be >= 0 voxels (0: never relabel), got {args.small_et}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = discover(args.input)
    runs, selection = args.runs, None
    if args.top is not None:
        runs, selection = select_top(args.runs, args.top, args.by)
        for fold, candidates in selection["folds"].items():
            print(f"fold {fold}: " + ", ".join(
                f"{c['model']} (arm {str(c['arm_run_id'])[:8]}) {args.by} {c['score']:.3f}{' chosen' if c['chosen'] else ''}"
                for c in candidates))
    members = load_members(runs, device)
    write_ensemble_record(args.output, members, selection, args.tta, args.precision, args.small_et, args.overwrite)
    written, skipped, failures = predict_folder(
        cases, members, args.output, device, tta=args.tta, probabilities=args.probabilities,
        small_et=args.small_et, overwrite=args.overwrite, precision=args.precision,
    )
    for failure in failures:
        _error(failure)
    print(f"{len(members)} model(s){' x 16 views' if args.tta else ''}: wrote {len(written)} label maps to {args.output}"
          + (f", skipped {len(skipped)} already there (--overwrite redoes them)" if skipped else "")
          + (f"; {len(failures)} cases failed" if failures else ""))
    return 1 if failures else 0


def _merge(args: argparse.Namespace) -> int:
    from brats_lab.inference.merge import merge_folders
    from brats_lab.labels import CONVENTIONS

    written, problems = merge_folders(args.a, args.b, args.output, CONVENTIONS[args.labels])
    for problem in problems:
        _error(problem)
    print(f"merged {len(written)} label maps into {args.output}" + (f"; {len(problems)} problems" if problems else ""))
    return 1 if problems else 0


def _default_profile() -> str:
    import torch

    profile = "paper" if torch.cuda.is_available() else "cpu"
    print(f"profile: {profile} (no --profile given; {'a GPU' if profile == 'paper' else 'no GPU'} found)")
    return profile


def _ablate(args: argparse.Namespace) -> int:
    from brats_lab.ablation.report import plan_text
    from brats_lab.ablation.storage import DEFAULT_STORAGE
    from brats_lab.ablation.spec import load_ablation
    from brats_lab.ablation.study import default_workers, make_plan, run_study

    profile = args.profile or _default_profile()
    ablation = load_ablation(args.ablation)
    if args.noise is not None and not (args.plan and args.noise > 0 and math.isfinite(args.noise)):
        raise DataError(f"--noise goes with --plan and must be a finite number above 0, got {args.noise}")
    for option, value in (("--seeds", args.seeds), ("--workers", args.workers)):  # --folds: make_plan knows the data's folds
        if value is not None and value < 1:
            raise DataError(f"{option} must be at least 1, got {value}")
    for flag, given in (("--slurm-set", args.slurm_set), ("--detach", args.detach)):
        if given and not args.slurm:
            raise DataError(f"{flag} goes with --slurm")
    slurm = _slurm_settings(args, ablation, profile) if args.slurm else None  # refused before anything is made
    if args.report:
        plan = make_plan(args.ablation, profile, args.folds, str(args.data or ablation.phantom_dataset or DEFAULT_PHANTOM),
                         args.storage or DEFAULT_STORAGE, args.seeds)
        from brats_lab.ablation.study import report_when_done

        print(report_when_done(plan).text())
        return 0
    if args.plan:  # nothing trained, no dataset needed
        plan = make_plan(args.ablation, profile, args.folds, str(args.data or ablation.phantom_dataset or DEFAULT_PHANTOM),
                         args.storage or DEFAULT_STORAGE, args.seeds)
        print(plan_text(plan, args.noise))
        return 0
    data = args.data or Path(ablation.phantom_dataset or DEFAULT_PHANTOM)
    if not data.is_dir():
        if args.data is not None:
            raise DataError(f"{data}: no dataset there")
        from brats_lab.data.phantom import DEMO_CASES, DEMO_NO_ET_FRACTION, DEMO_SHAPE, synthesize

        corrupt = ablation.phantom_corrupt_fraction
        print(f"no dataset at {data}: writing {DEMO_CASES} phantom cases ({' x '.join(map(str, DEMO_SHAPE))}) there first"
              + (f", {corrupt:.0%} of them with corrupted labels" if corrupt else ""))
        synthesize(data, cases=DEMO_CASES, seed=0, shape=DEMO_SHAPE, no_et_fraction=DEMO_NO_ET_FRACTION, corrupt_fraction=corrupt)
    plan = make_plan(args.ablation, profile, args.folds, str(data), args.storage or DEFAULT_STORAGE, args.seeds)
    print(f"study {plan.study_name}: {len(plan.ablation.arms)} arms x {len(plan.folds)} folds x {len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''} "
          f"(join from another machine: brats-lab worker --study {plan.study_name} --storage URL)")
    if slurm is not None:
        from brats_lab.ablation.slurm import run_on_slurm

        result = run_on_slurm(plan, slurm, detach=args.detach, say=lambda line: print(line, flush=True))
        if result is None:
            return 0
    else:
        workers = args.workers or default_workers(plan)
        if workers > 1:
            print(f"{workers} worker processes on this machine, {max(1, (os.cpu_count() or 1) // workers)} thread(s) each")
        result = run_study(plan, workers=workers)
    print()
    print(result.text())
    print(f"\nin MLflow: experiment {plan.experiment!r} (brats-lab ui); report files: {run_files.REPORT}, {run_files.TABLE3}, {run_files.COMPARISON} on the study run")
    return 0


def _slurm_settings(args: argparse.Namespace, ablation, profile: str):
    """The [slurm] tables of the profile and the ablation, then --slurm-set and --workers, checked
    (keys, values, and sbatch options against the installed sbatch)."""
    from brats_lab.ablation.slurm import check_options, overrides_layer, profile_table, settings

    layers = {f"profile {profile}": profile_table(profile), ablation.source: dict(ablation.slurm)}
    layers["--slurm-set"] = overrides_layer(args.slurm_set)
    if args.workers is not None:
        layers["--workers"] = {"workers": args.workers}
    result = settings(layers)
    check_options(result)
    return result


def _worker(args: argparse.Namespace) -> int:
    from brats_lab.ablation.study import work

    done = work(args.study, args.storage, progress=not args.quiet)
    print(f"worker: ran {done} trials of {args.study}; none left")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from brats_lab.evaluation.evaluate import evaluate_folder, format_summary
    from brats_lab.evaluation.lesionwise import RULE_NAMES

    if args.rules is not None and args.rules not in RULE_NAMES:
        raise DataError(f"--rules {args.rules}: unknown rules (expected one of: {', '.join(RULE_NAMES)})")
    result = evaluate_folder(args.pred, args.gt, rules=args.rules)
    out = args.out or args.pred / "metrics.csv"
    result.write_csv(out)
    print(format_summary(result))
    print(f"per-case metrics: {out}")
    if result.problems:
        _error(f"{len(result.problems)} problems (listed above; those cases are scored worst-case): "
               + _cases_named(result.problem_cases))
    return 1 if result.problems else 0


def _ui(args: argparse.Namespace) -> int:
    from brats_lab.mlflow_ui import serve_ui

    _port_option(args.port)
    return serve_ui(host=args.host, port=args.port)


def _dashboard(args: argparse.Namespace) -> int:
    _port_option(args.port)
    root = Path(__file__).resolve().parents[1]  # the checkout that holds dashboard/app.py
    app = root / "dashboard" / "app.py"
    if not app.is_file():
        raise DataError(f"{app}: the dashboard app is missing from this installation")
    # The app finds the store from the current folder (or MLFLOW_TRACKING_URI); keep the caller's.
    env = dict(os.environ)
    if not env.get("MLFLOW_TRACKING_URI"):
        from brats_lab.tracking import tracking_uri

        env["MLFLOW_TRACKING_URI"] = tracking_uri()
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    print(f"dashboard on http://{args.host}:{args.port}/  (store: {safe_url(env['MLFLOW_TRACKING_URI'])}; Ctrl-C stops it)", flush=True)
    # In the caller's folder: runs record their dataset as given, often relative to the project.
    return run_foreground(cmd, env, cwd=Path.cwd())

if __name__ == "__main__":
    sys.exit(main())
