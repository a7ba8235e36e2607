#!/usr/bin/env bash
# One call of the device tool (nvidia-h200, one H200) for issue #19 item 4, inside a strict time
# budget: every step has its own `timeout`, a failing step does not stop the next one, and the
# optional last step only starts when the budget still holds enough time for it.
#
#   1. setup: the carried wheels (.whl/) into /tmp/site, as the device notes say; versions; the
#      random-init model directory for the parity pair (built once, before the two cases start)
#   2. side by side on the one GPU (both are launch-bound at this size, so they share it well):
#      loss parity, baseline (plain TRL SFTTrainer QLoRA script) and kubetune, PARITY_STEPS steps
#      each, every step's loss appended to $OUT/parity-<case>.jsonl as it is logged (a run cut by
#      its timeout still leaves its curve); and pytest tests/trainer/test_gpu_paths.py
#   3. bench/dpo_throughput.py "$DPO_ARGS", timeout 170 s (less where the budget has less left),
#      alone on the GPU so its tokens/s is not shared
#   Throughout steps 2 and 3: bench/data_scale.py's 1M rows on CPU cores 4-15 (the GPU steps keep
#   cores 0-3), for issue #19's peak-RSS goal
#
# Run from the repository root on the GPU machine, with `.whl` and `build/devtok` carried:
#   bash bench/gpu_session.sh
# Then, here: bench/plot_parity.py on the returned $OUT/parity-*.jsonl (see its docstring).
#
# Settings (environment): BUDGET_S (520: no step starts after it, the optional one must end by it),
# PARITY_ARCH (qwen2.5-0.5b), PARITY_LAYERS (12), PARITY_STEPS (200), PARITY_TIMEOUT_S (300),
# PYTEST_TIMEOUT_S (180), DPO_ARGS (arguments of bench/dpo_throughput.py; write $OUT in them to
# put its files there), DPO_TIMEOUT_S (170), DATA_ROWS (1000000), TOKENIZER (build/devtok).
# $OUT takes at most 8 files back: session.log, parity-{baseline,kubetune}.{jsonl,log},
# pytest-gpu.log, dpo.log and data-scale.json (the DPO run's JSON line is the last of dpo.log).

set -u
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder whose files come back}"
BUDGET_S=${BUDGET_S:-520}
PARITY_ARCH=${PARITY_ARCH:-qwen2.5-0.5b}
PARITY_LAYERS=${PARITY_LAYERS:-12}
PARITY_STEPS=${PARITY_STEPS:-200}
PARITY_TIMEOUT_S=${PARITY_TIMEOUT_S:-300}
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-180}
DPO_TIMEOUT_S=${DPO_TIMEOUT_S:-170}
TOKENIZER=${TOKENIZER:-build/devtok}
SESSION=$OUT/session.log
T0=$SECONDS

log() { echo "[$(date -u +%T) +$((SECONDS - T0))s] $*" | tee -a "$SESSION"; }

# step NAME LIMIT_S LOGFILE COMMAND...: runs COMMAND under timeout, output to LOGFILE, logs rc and time.
step() {
  local name=$1 limit=$2 out=$3 t=$SECONDS rc
  shift 3
  log "start $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" >>"$out" 2>&1
  rc=$?
  log "end $name rc=$rc$([ $rc = 124 ] || [ $rc = 137 ] && echo ' (TIMED OUT)') in $((SECONDS - t))s"
  return $rc
}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/hf \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# ---- 1. setup ---------------------------------------------------------------------------------
log "budget ${BUDGET_S}s; parity ${PARITY_ARCH} with ${PARITY_LAYERS} layers, ${PARITY_STEPS} steps"
nvidia-smi -L >>"$SESSION" 2>&1
step wheels 90 "$SESSION" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/trainer_image:$PWD/operator
step versions 60 "$SESSION" python3 -c '
import importlib.metadata as m, torch
print({n: m.version(n) for n in ("torch", "transformers", "peft", "accelerate", "trl", "datasets",
                                 "bitsandbytes", "liger-kernel", "pydantic", "minio")})
print(torch.cuda.get_device_name(0), torch.cuda.is_available())
import kubetune_trainer.training, kubetune.api.finetunejob, bitsandbytes, liger_kernel
from kubetune_trainer.modeling import load_tokenizer
print("tokenizer", len(load_tokenizer(__import__("pathlib").Path("'"$TOKENIZER"'"))))'
step model-dir 90 "$SESSION" python3 bench/loss_parity.py --build-model-only \
  --arch "$PARITY_ARCH" --layers "$PARITY_LAYERS"

# ---- the 1M-row data preparation (issue #19's peak-RSS goal) on cores 4-15 and no GPU, for the
# rest of the session; the GPU steps below keep cores 0-3 ------------------------------------
step data-scale "$((BUDGET_S - (SECONDS - T0)))" "$SESSION" env CUDA_VISIBLE_DEVICES= \
  taskset -c 4-15 python3 bench/data_scale.py --tokenizer "$TOKENIZER" --rows "${DATA_ROWS:-1000000}" \
  --out "$OUT/data-scale.json" &
DATA_SCALE=$!

# ---- 2. loss parity pair and the GPU packing-parity tests, side by side ----------------------
for case in baseline kubetune; do
  rm -f "$OUT/parity-$case.jsonl"
  step "parity-$case" "$PARITY_TIMEOUT_S" "$OUT/parity-$case.log" taskset -c 0-3 python3 bench/loss_parity.py \
    --case "$case" --arch "$PARITY_ARCH" --layers "$PARITY_LAYERS" --steps "$PARITY_STEPS" \
    --tokenizer "$TOKENIZER" --log "$OUT/parity-$case.jsonl" &
done
step pytest-gpu "$PYTEST_TIMEOUT_S" "$OUT/pytest-gpu.log" taskset -c 0-3 python3 -m pytest -p no:cacheprovider \
  -v tests/trainer/test_gpu_paths.py &
wait $(jobs -p | grep -vx "$DATA_SCALE")
log "pytest-gpu: $(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$OUT/pytest-gpu.log" 2>/dev/null | tail -n 1)"
for case in baseline kubetune; do
  log "parity-$case: $(cat "$OUT/parity-$case.jsonl" 2>/dev/null | grep -c '"step"') steps logged;" \
      "last: $(tail -n 1 "$OUT/parity-$case.jsonl" 2>/dev/null | cut -c1-160)"
done
# The comparison's figures in the log (the PNG and results JSON are made locally from the JSONL).
step parity-summary 30 /tmp/parity-summary.txt python3 bench/plot_parity.py --out /tmp/parity.png \
  "baseline=$OUT/parity-baseline.jsonl" "kubetune=$OUT/parity-kubetune.jsonl"
log "parity: $(grep 'steps (reference' /tmp/parity-summary.txt)"

# ---- 3. DPO throughput, alone on the GPU (cores 0-3) -----------------------------------------
left=$((BUDGET_S - (SECONDS - T0)))
limit=$((left < DPO_TIMEOUT_S ? left : DPO_TIMEOUT_S))
if [ "$limit" -ge 60 ]; then
  # shellcheck disable=SC2086  # DPO_ARGS is a list of words
  step dpo "$limit" "$OUT/dpo.log" taskset -c 0-3 python3 bench/dpo_throughput.py \
    ${DPO_ARGS:---tokenizer $TOKENIZER}
  tail -n 3 "$OUT/dpo.log" | cut -c1-600 >>"$SESSION"
else
  log "dpo: skipped, ${left}s of the budget left"
fi
wait "$DATA_SCALE"
log "done"
