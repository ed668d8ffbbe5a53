#!/usr/bin/env bash
# The paper profile end to end, as a researcher's first run goes (issue 14): phantoms written to
# disk, pipeline B trained with `--profile paper`, SIGKILLed mid-epoch and resumed, pipeline A
# trained (with SWA snapshots), `predict --tta` of each arm on held-out cases, `merge`, `evaluate`,
# and `bench_train.py`'s step-only figure for comparison. Epochs and SWA cycles are shortened
# through --set; everything else is the paper's setting.
#
#   bash benchmarks/gpu_e2e.sh install   # install the wheels in build/wheels (run 1 of 2), stop
#   bash benchmarks/gpu_e2e.sh           # install what build/wheels holds, then the whole path
#   bash benchmarks/gpu_e2e.sh --cpu     # the same steps, --profile cpu, tiny network, small
#                                        # phantoms, in this Python (tests/test_gpu_e2e.py)
#
# On a lent GPU machine (torch, no SimpleITK/MLflow/nilearn, no network), two calls, each carrying
# at most 64 MiB of wheels made by `benchmarks/gpu_wheels.sh` (see benchmarks/README.md):
#   run(command="bash benchmarks/gpu_e2e.sh install", carry=["build/wheels"], timeout_s=120)
#   run(command="bash benchmarks/gpu_e2e.sh", carry=["build/wheels"], timeout_s=600)
# The installed packages stay in build/gpu-site (ignored, kept while the machine stays warm).
#
# Writes to $OUT (default build/gpu-e2e): e2e.json and e2e.md (per-epoch wall time split into
# data wait / step / validation, GPU memory peak, samples/s against bench_train.py, final
# metrics), the logs of every command, and evaluate's CSVs. Exit 0 only if every step worked.
set -uo pipefail

mode=${1:-gpu}
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${OUT:-$repo/build/gpu-e2e}" && cd "${OUT:-$repo/build/gpu-e2e}" && pwd)
work=${E2E_WORK:-$repo/build/e2e-work}
py=${PYTHON:-python3}
site=$repo/build/gpu-site
export PYTHONPATH=$repo:$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
log() { echo "[gpu_e2e $(date -u +%H:%M:%S)] $*" | tee -a "$out/steps.log"; }
fail() { log "FAILED: $*"; exit 1; }

# --- wheels --------------------------------------------------------------------------------------
if [ "$mode" != "--cpu" ]; then
  if compgen -G "$repo/build/wheels/*.whl" >/dev/null; then
    log "installing $(ls "$repo"/build/wheels/*.whl | wc -l) wheels into build/gpu-site"
    mkdir -p "$site"
    # --no-deps: the wheel set is complete by construction (gpu_wheels.sh resolved it), and pip
    # must not look for anything else (no network there).
    $py -m pip install --quiet --no-index --no-deps --target "$site" "$repo"/build/wheels/*.whl 2>&1 | tail -3 \
      || for w in "$repo"/build/wheels/*.whl; do $py -m zipfile -e "$w" "$site"; done  # no pip: unzip
  fi
  missing=$($py - <<'EOF'
import importlib.util
need = ["torch", "numpy", "scipy", "pandas", "SimpleITK", "nibabel", "mlflow", "sqlalchemy", "alembic", "tqdm", "matplotlib", "nilearn"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
  if [ "$mode" = install ]; then
    log "installed; still missing: ${missing:-nothing}"
    exit 0
  fi
  [ -z "$missing" ] || fail "missing Python packages: $missing (bring them as wheels, see benchmarks/README.md)"
fi

# --- the settings of each mode -------------------------------------------------------------------
if [ "$mode" = "--cpu" ]; then
  profile=cpu; cases=4; heldout=2; shape="48 48 32"; bench_steps=2
  common=(--set model.width=4 --set "data.patch_size=[32, 32, 32]" --set data.folds=2 --set train.batch_size=2 --set train.val_every=1)
  set_a=(--set train.epochs=2 --set train.swa.cycles=1 --set train.swa.cycle_epochs=2 --set train.swa.anneal_epochs=2 --set train.swa.snapshot_every=1)
  set_b=(--set train.epochs=4)
else
  profile=paper; cases=${E2E_CASES:-10}; heldout=2; shape="240 240 155"; bench_steps=10
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  # 10 cases in 5 folds: 8 training cases (8 steps of A, 3 of B per epoch), 2 validated whole.
  common=(--set train.val_every=1 ${E2E_SET:-})
  set_a=(--set train.epochs=3 --set train.swa.cycles=2 --set train.swa.cycle_epochs=2 --set train.swa.anneal_epochs=2 --set train.swa.snapshot_every=1)
  set_b=(--set train.epochs=5)
fi
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'threads', torch.get_num_threads())" | tee -a "$out/steps.log"
rm -rf "$work"; mkdir -p "$work"; cd "$work" || exit 1
cli() { $py -m brats_lab.cli "$@"; }

# --- data: training phantoms, and held-out cases of another seed (patients no fold has seen) ------
log "phantoms: $cases + $heldout cases of $shape voxels"
cli data synth --out data --cases "$cases" --seed 0 --shape $shape > "$out/synth.log" 2>&1 || fail "data synth (synth.log)"
cli data synth --out heldout --cases "$heldout" --seed 1 --shape $shape > "$out/synth_heldout.log" 2>&1 || fail "data synth held-out"

# --- pipeline B: trained, SIGKILLed mid-epoch once a checkpoint exists, resumed ------------------
log "pipeline B, --profile $profile, killed after its first checkpoint"
# Python itself in the background (not through the `cli` function: $! would be a subshell's).
$py -m brats_lab.cli train --pipeline B --fold 0 --profile "$profile" --data data "${common[@]}" "${set_b[@]}" > "$out/train_B_killed.log" 2>&1 &
pid=$!
alive() { [ -r /proc/$pid/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$pid/status; }  # a zombie has ended
for _ in $(seq 1 3000); do  # up to 5 minutes
  [ -n "$(find mlruns -path '*checkpoints/last.pt' 2>/dev/null | head -1)" ] && break
  alive || break
  sleep 0.1
done
alive || fail "pipeline B ended before it could be killed (train_B_killed.log)"
kill -KILL $pid; wait $pid 2>/dev/null
log "killed pipeline B (pid $pid); resuming"
cli train --pipeline B --fold 0 --profile "$profile" --data data "${common[@]}" "${set_b[@]}" --resume > "$out/train_B.log" 2>&1 || fail "resume of B (train_B.log)"
arm_b=$(grep -o 'under arm run [0-9a-f]*' "$out/train_B.log" | awk '{print $4}')

# --- pipeline A: the self-ensembling phase with snapshots ----------------------------------------
log "pipeline A, --profile $profile"
cli train --pipeline A --fold 0 --profile "$profile" --data data "${common[@]}" "${set_a[@]}" > "$out/train_A.log" 2>&1 || fail "train A (train_A.log)"
arm_a=$(grep -o 'under arm run [0-9a-f]*' "$out/train_A.log" | awk '{print $4}')
[ -n "$arm_a" ] && [ -n "$arm_b" ] || fail "no arm run id in the training output"

# --- held-out cases: predict with TTA, merge, evaluate -------------------------------------------
for p in A B; do
  arm=$([ $p = A ] && echo "$arm_a" || echo "$arm_b")
  log "predict --tta with arm $p ($arm)"
  start=$(date +%s.%N)
  cli predict --run "$arm" --input heldout --output "pred_$p" --tta > "$out/predict_$p.log" 2>&1 || fail "predict $p"
  echo "$start $(date +%s.%N)" > "$out/predict_$p.seconds"
done
log "merge, evaluate"
cli merge --a pred_A --b pred_B --output pred_merged > "$out/merge.log" 2>&1 || fail "merge"
for p in A B merged; do
  cli evaluate --pred "pred_$p" --gt heldout --out "$out/evaluate_$p.csv" > "$out/evaluate_$p.log" 2>&1 || fail "evaluate $p"
done

# --- the step alone, as bench_train.py measures it -----------------------------------------------
for p in A B; do
  log "bench_train.py --pipeline $p (paper variant, step only)"
  $py "$repo/benchmarks/bench_train.py" --profile "$profile" --pipeline $p --variants paper --steps $bench_steps --skip-loader "${common[@]}" \
    --json "$out/bench_train_$p.json" > "$out/bench_train_$p.log" 2>&1 || fail "bench_train $p"
done

log "report"
$py "$repo/benchmarks/gpu_e2e_report.py" --root "$work" --out "$out" --cases "$cases" || fail "report"
log "done: $out/e2e.md"
