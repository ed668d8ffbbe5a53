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
  # The final weights and the resume path (PARTS), with the tests that train in the test process.
  [brats_lab/training/trainer.py]="tests/training/test_final_weights.py::test_snapshots_win_over_best_and_last_and_their_mean_is_loaded tests/training/test_final_weights.py::test_without_snapshots_keep_best_loads_the_best_weights_and_names_their_epoch tests/training/test_final_weights.py::test_otherwise_the_last_weights_stay tests/training/test_trainer.py::test_a_training_killed_after_any_epoch_resumes_to_the_same_state tests/training/test_trainer.py::test_resume_without_an_unfinished_run_is_a_clear_error tests/training/test_trainer.py::test_a_fold_run_is_tagged_with_what_trains_it_once_and_with_its_worker_at_every_start tests/test_faults.py::test_train_resume_refuses_a_bad_checkpoint_by_name_without_running_it"
  [brats_lab/evaluation/lesionwise.py]="tests/evaluation/test_lesionwise.py"
  [brats_lab/training/scoring.py]="tests/training/test_scoring.py"
  # The plan, the seeds, reuse by hash and choose_removed (PARTS), with the tests that train nothing.
  [brats_lab/ablation/study.py]="tests/ablation/test_study_cells.py tests/ablation/test_study.py::test_each_fold_and_seed_trains_with_its_own_seed_and_both_arms_of_a_pair_with_the_same tests/ablation/test_study.py::test_patient_removal_removes_the_worst_cases_in_the_metrics_direction_ties_by_case_id"
  [brats_lab/ablation/report.py]="tests/ablation/test_report.py"
  [brats_lab/data/splits.py]="tests/data/test_splits.py"
  [brats_lab/training/checkpoint.py]="tests/training/test_checkpoint.py"
  [brats_lab/ablation/spec.py]="tests/ablation/test_spec.py"
  [brats_lab/data/check.py]="tests/data/test_check.py"
  # test_cache.py without the phantom round trip (a phantom set per mutant) and the concurrent prepares (subprocesses)
  [brats_lab/data/cache.py]="tests/data/test_cache.py::test_prepare_then_load_matches_preprocess_case tests/data/test_cache.py::test_second_prepare_reuses_everything tests/data/test_cache.py::test_touched_but_unchanged_input_is_reused tests/data/test_cache.py::test_changed_input_rebuilds_exactly_that_case tests/data/test_cache.py::test_damaged_array_is_detected_and_rebuilt tests/data/test_cache.py::test_verify_hashes_catches_damage_that_kept_the_stat tests/data/test_cache.py::test_method_changes_the_manifest_hash_and_folder tests/data/test_cache.py::test_removed_and_added_cases tests/data/test_cache.py::test_bad_case_raises_and_keeps_the_previous_manifest tests/data/test_cache.py::test_crash_before_the_manifest_leaves_it_valid tests/data/test_cache.py::test_case_without_seg tests/data/test_cache.py::test_progress_bar_goes_to_stderr tests/data/test_cache.py::test_a_preprocessing_version_bump_rebuilds_every_case tests/data/test_cache.py::test_an_entry_is_rebuilt_exactly_when_its_inputs_or_settings_change tests/data/test_cache.py::test_inputs_are_read_again_only_when_their_stat_cannot_be_trusted tests/data/test_cache.py::test_the_recorded_settings_are_the_ones_every_version_compares tests/data/test_cache.py::test_a_case_without_segmentation_among_cases_with_one_is_refused tests/data/test_cache.py::test_the_records_on_disk_are_recomputed_from_the_files_alone tests/data/test_cache.py::test_an_entry_finished_before_a_crash_spares_reading_its_inputs_again tests/data/test_cache.py::test_a_deleted_entry_folder_is_rebuilt_and_said_missing"
)

# Parts of a module: the trainer's final weights and resume path (the rest of train_fold costs a
# training per mutant; its final-weight lines are broken by hand, docs/mutation.md). The trainings of
# test_final_weights.py run the CLI in a subprocess, which cannot import mutmut's mutated copy:
# only its in-process tests are selected.
declare -A PARTS=(
  [brats_lab/training/trainer.py]="brats_lab.training.trainer.*load_final_weights* brats_lab.training.trainer.x__unfinished_run__* brats_lab.training.trainer.x__restore__* brats_lab.training.trainer.x__tag_run__*"
  [brats_lab/ablation/study.py]="brats_lab.ablation.study.xǁPlanǁ* brats_lab.ablation.study.x_make_plan__* brats_lab.ablation.study.x_run_cell__* brats_lab.ablation.study.x__arm_run__* brats_lab.ablation.study.x_choose_removed__*"
  # Every function but the two that build the rule table: they run once, at import, before mutmut
  # switches a mutant on, so no test can see their mutants (the table is checked against its
  # sources by test_each_rule_set_has_the_regions_and_labels_of_its_source).
  [brats_lab/evaluation/lesionwise.py]="brats_lab.evaluation.lesionwise.x_rules_for__* brats_lab.evaluation.lesionwise.x__label_text__* brats_lab.evaluation.lesionwise.x_lesion_metrics__* brats_lab.evaluation.lesionwise.x_lesion_columns__* brats_lab.evaluation.lesionwise.x_case_scores__* brats_lab.evaluation.lesionwise.x__bipartite__* brats_lab.evaluation.lesionwise.x__volume_metrics__* brats_lab.evaluation.lesionwise.x__dilation__* brats_lab.evaluation.lesionwise.x__overlaps__* brats_lab.evaluation.lesionwise.x__pieces__* brats_lab.evaluation.lesionwise.xǁ_Lesionsǁ* brats_lab.evaluation.lesionwise.xǁLesionMetricsǁ* brats_lab.evaluation.lesionwise.x__unknown_labels__* brats_lab.evaluation.lesionwise.x__grow__* brats_lab.evaluation.lesionwise.x__union_box__* brats_lab.evaluation.lesionwise.x__hd95_in_box__*"
  # The cache's keys and fingerprints: what decides that an entry is reused or rebuilt.
  [brats_lab/data/cache.py]="brats_lab.data.cache.x_settings__* brats_lab.data.cache.x__prepare_locked__* brats_lab.data.cache.x__why__* brats_lab.data.cache.x__known_inputs__* brats_lab.data.cache.x__hash_inputs__* brats_lab.data.cache.x__content_hash__* brats_lab.data.cache.x__sha256_file__* brats_lab.data.cache.x__sha256_json__*"
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
