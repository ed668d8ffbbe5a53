#!/usr/bin/env bash
# The prepared GPU check: one call on a lent GPU machine (no network, no SimpleITK there), e.g.
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=560)
# Results land in $OUT (or ./gpu-results) as JSON plus the printed tables.
set -uo pipefail
out=${OUT:-gpu-results}; mkdir -p "$out"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for pipeline in A B; do
  timeout 240 python3 benchmarks/bench_train.py --profile paper --pipeline $pipeline --skip-loader \
    --json "$out/train_paper_$pipeline.json" 2>&1 | grep -v -i warn | tee "$out/train_paper_$pipeline.txt"
done
timeout 300 python3 benchmarks/bench_inference.py --profile paper --json "$out/inference_paper.json" 2>&1 | grep -v -i warn | tee "$out/inference_paper.txt"
