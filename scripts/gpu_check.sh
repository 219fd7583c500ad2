#!/usr/bin/env bash
# A short GPU check: a few RL steps with each rollout backend, printing the median step time and
# the rollout throughput (generated tokens per second). Run it from the repository root on a CUDA
# machine with the project installed; the vLLM backend runs only where vLLM imports.
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/gpu_check}
STEPS=${STEPS:-20}
COMMON=(--set run.steps="$STEPS" --set run.tensorboard=false --set model.builtin=tiny-10m
        --set task.prompts_per_step=64 --set rollout.group_size=8 --set rollout.max_new_tokens=16
        --set model.dtype=bfloat16 --no-progress --overwrite)

summarise() {
  "$PY" - "$1" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")][2:]  # skip warm-up steps
step = statistics.median(r["time/step_s"] for r in rows)
rollout = statistics.median(r["time/rollout_s"] for r in rows)
tokens = statistics.median(r["response/length_mean"] * 64 * 8 for r in rows)
print(f"{sys.argv[1]}: median step {step:.3f} s, rollout {rollout:.3f} s, {tokens / rollout:,.0f} generated tok/s")
PYEOF
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m entroclip train configs/quick.yaml --out "$OUT/hf" --set rollout.backend=hf "${COMMON[@]}"
summarise "$OUT/hf"
if "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m entroclip train configs/quick.yaml --out "$OUT/vllm" --set rollout.backend=vllm "${COMMON[@]}"
  summarise "$OUT/vllm"
else
  echo "vllm not importable here: vLLM backend skipped"
fi
