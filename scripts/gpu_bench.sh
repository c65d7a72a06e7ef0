#!/usr/bin/env bash
# The GPU check of the product paths, run on a lent GPU machine (docs/gpu.md): the README's main job
# (in-memory, reconstruction on the GPU), the same prune streamed through `--device cuda` (compared weight by
# weight with it), the retrain-free grid with the papers' calibration size (128 x 2048 tokens) against the
# default, `depgraph-llm eval` (GPU bf16 speed, GPU peak memory) and LoRA + distillation recovery on the GPU,
# each grid row evaluated on four registers none of which it calibrated or trained on.
# Steps run in order of priority under one wall-clock budget; every step's output goes to $OUT/log.txt.
#
#   OUT=/tmp/gpu-out BUDGET_S=520 bash scripts/gpu_bench.sh
#   EXTRA="--calibration-samples 2 --seq-len 64" BUDGET_S=300 bash scripts/gpu_bench.sh   # plumbing check on a CPU
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/tmp/gpu-work}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
LOG=$OUT/log.txt
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-520} ))

step() {  # step NAME LIMIT_S COMMAND...: run under the smaller of LIMIT_S and the time left, log wall time + rc
  local name=$1 limit=$2 left start rc
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 30 )); then echo "== $name: skipped, ${left}s left" | tee -a "$LOG"; return 1; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$EPOCHREALTIME
  timeout "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  python3 -c "import sys; print(f'== $name: rc=$rc wall={float(sys.argv[2]) - float(sys.argv[1]):.1f}s')" \
    "$start" "$EPOCHREALTIME" | tee -a "$LOG"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)"; } | tee -a "$LOG"

# 1. The README's main job; the model is imported from the embedded GGUF into $DEPGRAPH_LLM_CACHE on first use.
step main-0.25 200 python3 prune.py --ratio 0.25 --out "$WORK/o25" --overwrite $EXTRA

# 2. The same prune, one decoder layer at a time through the GPU: must choose the same channels.
step streaming-0.25 150 python3 prune.py --ratio 0.25 --device cuda --out "$WORK/o25s" --overwrite --no-eval $EXTRA
step compare 60 python3 scripts/compare_checkpoints.py "$WORK/o25" "$WORK/o25s" --json "$OUT/streaming_vs_in_memory.json"
cp "$WORK/o25/prune_report.json" "$OUT/main_prune_report.json" 2>/dev/null
cp "$WORK/o25/prune_plan.json" "$OUT/main_prune_plan.json" 2>/dev/null

# 3. The grid: the default recipe vs the papers' calibration size, both ratios (bench_grid evaluates on 4 registers).
GRID=(python3 scripts/bench_grid.py --out "$OUT/grid" --custom "default-gpu=--reconstruct obs $EXTRA"
      --custom "cal128x2048=--calibration-samples 128 --seq-len 2048 $EXTRA"
      --custom "cal128x2048+cross-block=--calibration-samples 128 --seq-len 2048 --cross-block 2
                --cross-block-epochs 4 --cross-block-lr 1e-4 $EXTRA"
      --custom "lora-distill-1000=--recover lora --teacher dense --recover-steps 1000 $EXTRA"
      --custom "search-cal128x2048=--schedule search --calibration-samples 128 --seq-len 2048 $EXTRA")
step grid-0.2 150 "${GRID[@]}" --ratios 0.2 --rows default-gpu,cal128x2048
step grid-0.5 150 "${GRID[@]}" --ratios 0.5 --rows default-gpu,cal128x2048

# 4. Evaluation on the GPU: bf16 speed and GPU peak memory, dense vs the 0.25 model.
DENSE=$(python3 -c "from depgraph_llm.checkpoint.loading import resolve_model_path; print(resolve_model_path(None))" | tail -1)
step eval-0.25 120 python3 -m depgraph_llm.cli eval "$WORK/o25" --baseline "$DENSE" --report-dir "$WORK/eval" --limit 50 \
  --cloze-items 100 && cp "$WORK/eval/report.json" "$OUT/eval_report.json"

# 5. Recovery on the GPU: LoRA + distillation from the dense model (1000 steps of 4 x 128 tokens), as grid rows.
step grid-recover 200 "${GRID[@]}" --ratios 0.5,0.2 --rows lora-distill-1000

# 6. Whatever time is left: the search schedule (the best CPU row) and cross-block on the large calibration.
step grid-search 300 "${GRID[@]}" --ratios 0.2,0.5 --rows search-cal128x2048
step grid-cross-block 300 "${GRID[@]}" --ratios 0.2,0.5 --rows cal128x2048+cross-block
echo "== done" | tee -a "$LOG"
