#!/usr/bin/env bash
# Entropy control under verifiable rewards with a reasoning trace (docs/results.md section 1d), in four
# resumable sweeps; re-running continues unfinished runs (--resume) and rewrites the reports:
#   runs/study/trace_static     configs/study/rlvr_trace.yaml, static eps_low 0.05 / 0.1 / 0.2 / 0.3
#                               (eps_high 0.2) and clip-low off, 5 seeds: does eps_low order the entropy?
#   runs/study/control_trace    the controllers at their defaults, target 0.8 x the step-1 entropy, against
#                               static (0.2, 0.2), on the trace task, 5 seeds (static seeds taken over);
#   runs/study/control_addition the same on configs/study/rlvr_addition.yaml, 5 seeds;
#   runs/study/tracking_*       the cascade tracking 0.8 x start to step 75, then 0.6 x, 3 seeds.
# The counterfactual clip probe runs every 5 steps (the study configs); every run's per-step metrics are
# kept under docs/results/. STAGES (default "static trace addition tracking") picks sweeps.
set -euo pipefail
ENTROCLIP=${ENTROCLIP:-.venv/bin/entroclip}
WORKERS=${WORKERS:-2}
STAGES=${STAGES:-static trace addition tracking}
TRACE=configs/study/rlvr_trace.yaml
ADDITION=configs/study/rlvr_addition.yaml
TARGET="control.target_ratio=0.8"
GAINS="control.kp=2;control.ki=0.5"  # the PI gains of every controller here (the defaults 1, 0.1 are clip_low's)
CONTROLLERS=(
  --setting "static-0.2-0.2:loss.eps_low=0.2"
  --setting "clip:control.kind=clip;$TARGET;$GAINS"
  --setting "token_weight:control.kind=token_weight;$TARGET;$GAINS"
  --setting "cascade:control.kind=cascade;$TARGET;$GAINS"
)

[ -f runs/sft/model.safetensors ] || "$ENTROCLIP" sft --out runs/sft
[ -f runs/sft_trace/model.safetensors ] || "$ENTROCLIP" sft --out runs/sft_trace --task trace \
  --options '{base: addition, base_options: {digits: 2}, trace_len: 10, trace_alphabet: abcd}'

publish() {  # the sweep's report, figures and per-step metrics under docs/results/
  local study=$1
  mkdir -p "docs/results/$study"
  cp -r "runs/study/$study/plots" "runs/study/$study/report.md" "runs/study/$study/summary.json" "docs/results/$study/"
  tar -czf "docs/results/$study/metrics.tar.gz" -C "runs/study/$study" \
    $(cd "runs/study/$study" && ls -d */seed*/metrics.jsonl)
}

take_static() {  # static (0.2, 0.2) seeds of one sweep into another with the same config
  local from=$1 to=$2 seeds=$3
  for seed in $(seq 0 $((seeds - 1))); do
    target=runs/study/$to/static-0.2-0.2/seed$seed
    source=runs/study/$from/static-0.2-0.2/seed$seed
    [ -d "$target" ] || [ ! -f "$source/metrics.jsonl" ] || { mkdir -p "$(dirname "$target")"; cp -r "$source" "$target"; }
  done
}

if [[ " $STAGES " == *" static "* ]]; then
  "$ENTROCLIP" sweep "$TRACE" --seeds 5 --workers "$WORKERS" --resume --out runs/study/trace_static \
    --baseline static-0.2-0.2 \
    --setting "static-0.05-0.2:loss.eps_low=0.05" \
    --setting "static-0.1-0.2:loss.eps_low=0.1" \
    --setting "static-0.2-0.2:loss.eps_low=0.2" \
    --setting "static-0.3-0.2:loss.eps_low=0.3" \
    --setting "static-off-0.2:loss.eps_low=null"
  publish trace_static
fi

if [[ " $STAGES " == *" trace "* ]]; then
  take_static trace_static control_trace 5
  "$ENTROCLIP" sweep "$TRACE" --seeds 5 --workers "$WORKERS" --resume --out runs/study/control_trace \
    --baseline static-0.2-0.2 "${CONTROLLERS[@]}"
  publish control_trace
fi

if [[ " $STAGES " == *" addition "* ]]; then
  "$ENTROCLIP" sweep "$ADDITION" --seeds 5 --workers "$WORKERS" --resume --out runs/study/control_addition \
    --baseline static-0.2-0.2 "${CONTROLLERS[@]}"
  publish control_addition
fi

if [[ " $STAGES " == *" tracking "* ]]; then
  for task in trace addition; do
    config=$TRACE; [ "$task" = trace ] || config=$ADDITION
    "$ENTROCLIP" sweep "$config" --seeds 3 --workers "$WORKERS" --resume --out "runs/study/tracking_$task" \
      --set run.steps=150 \
      --setting "cascade:control.kind=cascade;$TARGET;$GAINS;control.retarget={75: 0.6}"
    publish "tracking_$task"
  done
fi
