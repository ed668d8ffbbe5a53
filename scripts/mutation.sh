#!/usr/bin/env bash
# Mutation testing with mutmut, one module at a time: does a test fail when one line of the module
# is changed (a + into a -, a < into a <=, a constant into another...)? Not part of CI: each module
# takes minutes to tens of minutes on 2 cores. Results are kept in docs/mutation.md.
#
#   scripts/mutation.sh brats_lab/labels.py            # the module, with its fast tests (below)
#   scripts/mutation.sh brats_lab/labels.py tests/test_labels.py tests/test_cli.py   # other tests
#   scripts/mutation.sh --list                          # the modules and the tests used for each
#   MUTANTS='brats_lab.labels.*from_regions*' scripts/mutation.sh brats_lab/labels.py   # only these
#
# MUTANTS: space-separated mutmut names or globs (`mutmut show` prints the names): run and count
# only those mutants, e.g. one function's while writing its tests.
#
# It works on a copy of the repository's files (in a temporary folder, or $MUTATION_DIR to keep it),
# so the checkout is never changed; mutmut's `mutants/` folder and cache live in that copy. The
# surviving mutants are printed with their diff at the end (`mutmut show NAME` in the copy).
# One thread and one test process (`--max-children 1`): the project's machines have 2 cores;
# set MUTATION_CHILDREN to run several mutants at once on a bigger machine.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"

# The modules whose output is a number a user reads, and the fast tests that cover each.
declare -A TESTS=(
  [brats_lab/labels.py]="tests/test_labels.py"
  [brats_lab/inference/merge.py]="tests/inference/test_merge.py"
  [brats_lab/inference/tta.py]="tests/inference/test_tta.py"
  [brats_lab/inference/predict.py]="tests/inference/test_predict_fast.py"
  [brats_lab/evaluation/metrics.py]="tests/evaluation/test_metrics.py"
  [brats_lab/evaluation/stats.py]="tests/evaluation/test_stats.py"
  [brats_lab/evaluation/case_stats.py]="tests/evaluation/test_case_stats.py tests/evaluation/test_bootstrap_interval.py"
  [brats_lab/training/optim.py]="tests/training/test_optim.py"
  [brats_lab/training/trainer.py]="tests/training/test_final_weights.py::test_snapshots_win_over_best_and_last_and_their_mean_is_loaded tests/training/test_final_weights.py::test_without_snapshots_keep_best_loads_the_best_weights_and_names_their_epoch tests/training/test_final_weights.py::test_otherwise_the_last_weights_stay"
  [brats_lab/training/scoring.py]="tests/training/test_scoring.py"
  [brats_lab/ablation/study.py]="tests/ablation/test_study.py"
  [brats_lab/ablation/report.py]="tests/ablation/test_report.py"
  [brats_lab/data/splits.py]="tests/data/test_splits.py"
  [brats_lab/training/checkpoint.py]="tests/training/test_checkpoint.py"
  [brats_lab/ablation/spec.py]="tests/ablation/test_spec.py"
  [brats_lab/data/check.py]="tests/data/test_check.py"
)

# Parts of a module: the trainer's final weights (the rest of train_fold costs a training per
# mutant; its final-weight lines are broken by hand, docs/mutation.md). The trainings of
# test_final_weights.py run the CLI in a subprocess, which cannot import mutmut's mutated copy:
# only its in-process tests are selected.
declare -A PARTS=(
  [brats_lab/training/trainer.py]="brats_lab.training.trainer.*load_final_weights*"
)

if [[ "${1:-}" == "--list" || $# -eq 0 ]]; then
  for module in "${!TESTS[@]}"; do printf '%-36s %s%s\n' "$module" "${TESTS[$module]}" "${PARTS[$module]:+ (only ${PARTS[$module]})}"; done | sort
  [[ $# -eq 0 ]] && { echo "usage: scripts/mutation.sh MODULE [TEST...]" >&2; exit 2; }
  exit 0
fi
module="$1"; shift
[[ -f "$repo/$module" ]] || { echo "mutation.sh: no module $module" >&2; exit 2; }
if [[ $# -gt 0 ]]; then tests=("$@"); else
  [[ -n "${TESTS[$module]:-}" ]] || { echo "mutation.sh: no tests listed for $module; name them after the module" >&2; exit 2; }
  read -r -a tests <<< "${TESTS[$module]}"
fi
"$python" -c "import mutmut" 2>/dev/null || { echo "mutation.sh: mutmut is not installed in $python (pip install -e '.[dev]')" >&2; exit 2; }

work="${MUTATION_DIR:-$(mktemp -d)}"
mkdir -p "$work"
# The tracked and the new (not ignored) files: what the tests need, without .venv or caches.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work" 2>/dev/null || true)
quoted() { local out="" t; for t in "$@"; do out+="\"$t\", "; done; echo "[${out%, }]"; }
cat >> "$work/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["brats_lab/"]
only_mutate = ["$module"]
also_copy = ["tests/", "experiments/", "pyproject.toml"]
# No xdist, no -ra summary: one process; -x: the first failing test kills the mutant.
pytest_add_cli_args = ["-p", "no:xdist", "-o", "addopts=", "-q", "-x"]
pytest_add_cli_args_test_selection = $(quoted "${tests[@]}")
# A mutant that loops forever is stopped after 6 x (its tests' CPU time + 10 s), not mutmut's
# 30 x (time + 1 s). The 10 s: a module fixture's setup (a phantom cache) is counted in the time of
# the first test that used it only, and a mutant run that starts at a later test pays it again.
timeout_multiplier = 3.0
timeout_constant = 10.0
TOML

cd "$work"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
unset PYTHONPATH MLFLOW_TRACKING_URI  # the mutated copy under mutants/, not another checkout
echo "mutation.sh: $module against ${tests[*]} in $work" >&2
start=$SECONDS
read -r -a only <<< "${MUTANTS:-${PARTS[$module]:-}}"
"$python" -m mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${only[@]}" >"$work/mutmut-run.log" 2>&1 || { tail -40 "$work/mutmut-run.log" >&2; exit 1; }
"$python" -m mutmut results --all true 2>&1 | "$python" -c '
import fnmatch, sys
patterns = sys.argv[1:]  # with MUTANTS, count only the mutants that were run
for line in sys.stdin:
    name = line.strip().rsplit(": ", 1)[0]
    if not patterns or any(fnmatch.fnmatch(name, p) for p in patterns):
        sys.stdout.write(line)
' "${only[@]}" >"$work/results.txt" || true
killed=$(grep -c ': killed$' "$work/results.txt" || true)
survived=$(grep -c ': survived$' "$work/results.txt" || true)
other=$(grep -vcE ': (killed|survived)$' "$work/results.txt" || true)
echo "$module: $killed killed, $survived survived, $other other (timeout, no tests, ...) in $((SECONDS - start)) s"
grep -vE ': killed$' "$work/results.txt" || true
for name in $(grep ': survived$' "$work/results.txt" | sed 's/: survived$//; s/^ *//'); do
  echo "--- $name"; "$python" -m mutmut show "$name" 2>/dev/null | grep '^[-+][^-+]' || true
done
