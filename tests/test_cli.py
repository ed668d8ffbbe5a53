"""The `brats-lab` command end to end, in-process, on files."""

import argparse
import json
import subprocess
import sys

import pandas as pd
import pytest

from brats_lab.cli import build_parser, main

COMMANDS = [["data"], ["data", "synth"], ["data", "check"], ["data", "prepare"], ["baseline"], ["train"], ["predict"], ["merge"], ["evaluate"], ["ablate"], ["worker"], ["dashboard"], ["ui"]]


def _subparser(parser, words):
    for word in words:
        action = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
        parser = action.choices[word]
    return parser


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_every_option_of_every_command_is_explained(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    parser = _subparser(build_parser(), words)
    assert parser.description and parser.description.split()[0] in out
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # each sub-command's one-line help
                assert choice.help and choice.dest in out
        else:
            assert action.help, f"{' '.join(words)}: {action.dest} has no help"


def test_help_is_fast_because_heavy_modules_load_lazily():
    code = "import sys; from brats_lab.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'streamlit', 'scipy', 'SimpleITK') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_quickstart_chain_synth_check_prepare_baseline_evaluate(tmp_path, capsys):
    data, pred = tmp_path / "phantom", tmp_path / "pred"
    assert main(["data", "synth", "--out", str(data), "--cases", "3", "--shape", "48", "48", "32", "--corrupt-fraction", "0.34"]) == 0
    assert json.loads((data / "phantom.json").read_text())["cases"][0]
    assert main(["data", "check", str(data)]) == 0
    assert main(["data", "prepare", str(data), "--pipeline", "B"]) == 0
    assert main(["data", "prepare", str(data), "--pipeline", "B"]) == 0
    assert "3 reused, 0 built" in capsys.readouterr().out
    assert main(["baseline", "--input", str(data), "--output", str(pred)]) == 0
    assert main(["evaluate", "--pred", str(pred), "--gt", str(data), "--out", str(tmp_path / "m.csv")]) == 0
    table = pd.read_csv(tmp_path / "m.csv")
    assert len(table) == 3 and {"dice_WT", "hd95_ET", "status"} <= set(table.columns)
    assert "HD95" in capsys.readouterr().out


def test_evaluate_names_a_missing_prediction_and_fails(tmp_path, phantom_dataset, capsys):
    pred = tmp_path / "pred"
    assert main(["baseline", "--input", str(phantom_dataset), "--output", str(pred)]) == 0
    missing = sorted(pred.glob("*.nii.gz"))[0]
    missing.unlink()
    assert main(["evaluate", "--pred", str(pred), "--gt", str(phantom_dataset)]) == 1
    assert missing.name.removesuffix(".nii.gz") in capsys.readouterr().out
    assert (pred / "metrics.csv").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "synth", "--cases", "0"], "--cases must be at least 1"),
        (["data", "synth", "--shape", "8", "48", "32"], "--shape must be at least 16"),
        (["data", "synth", "--corrupt-fraction", "2"], "--corrupt-fraction must be between 0 and 1"),
        (["data", "prepare", "/nonexistent/data"], "/nonexistent/data: not a folder"),
        (["evaluate", "--pred", "/nonexistent/p", "--gt", "/nonexistent/g"], "nonexistent"),
    ],
)
def test_bad_arguments_give_one_clear_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("brats-lab: error:") and message in err and "Traceback" not in err


def test_synth_refuses_to_mix_two_datasets_in_one_folder(tmp_path, capsys):
    out = str(tmp_path / "p")
    assert main(["data", "synth", "--out", out, "--cases", "2", "--shape", "32", "32", "24"]) == 0
    before = (tmp_path / "p" / "phantom.json").read_bytes()
    assert main(["data", "synth", "--out", out, "--cases", "2", "--shape", "32", "32", "24"]) == 0  # the same again
    assert main(["data", "synth", "--out", out, "--cases", "3", "--shape", "32", "32", "24"]) == 1
    assert main(["data", "synth", "--out", out, "--cases", "2", "--shape", "48", "32", "24"]) == 1
    assert "already holds 2 case folders" in capsys.readouterr().err
    assert (tmp_path / "p" / "phantom.json").read_bytes() == before
