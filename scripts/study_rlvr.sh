#!/usr/bin/env bash
# The verifiable-reward entropy-control study of docs/results.md: 2-digit addition, exact-match reward,
# the SFT-warmed tiny model, 150 GRPO steps per run. Two sweeps share the base config
# configs/study/rlvr_addition.yaml and the seeds 0..N-1:
#   runs/study/rlvr_control    static (0.2, 0.2) and the clip-low controller with and without clip-high,
#                              5 seeds (the acceptance comparison);
#   runs/study/rlvr_baselines  static (0.2, 0.2), clip-higher, the paper's (0.15, off), an aggressive
#                              static clip-low, the entropy-bonus controller and Clip-Cov, 3 seeds (the
#                              static seeds are taken over from the first sweep).
# Re-running continues unfinished runs (--resume) and rewrites the reports and docs/results/ figures.
# Each run takes 3-4 minutes on one free core; WORKERS runs go in parallel.
set -euo pipefail
ENTROCLIP=${ENTROCLIP:-.venv/bin/entroclip}
WORKERS=${WORKERS:-2}
BASE=configs/study/rlvr_addition.yaml
CONTROLLER="control.kind=clip_low;control.target_ratio=0.8;control.eps_low_min=0.05"

[ -f runs/sft/model.safetensors ] || "$ENTROCLIP" sft --out runs/sft

"$ENTROCLIP" sweep "$BASE" --seeds 5 --workers "$WORKERS" --resume --out runs/study/rlvr_control \
  --baseline static-0.2-0.2 \
  --setting "static-0.2-0.2:loss.eps_low=0.2" \
  --setting "clip_low-ctl-0.2:$CONTROLLER" \
  --setting "clip_low-ctl-off:$CONTROLLER;loss.eps_high=null"

for seed in 0 1 2; do
  target=runs/study/rlvr_baselines/static-0.2-0.2/seed$seed
  [ -d "$target" ] || { mkdir -p "$(dirname "$target")"; cp -r runs/study/rlvr_control/static-0.2-0.2/seed$seed "$target"; }
done
"$ENTROCLIP" sweep "$BASE" --seeds 3 --workers "$WORKERS" --resume --out runs/study/rlvr_baselines \
  --baseline static-0.2-0.2 \
  --setting "static-0.2-0.2:loss.eps_low=0.2" \
  --setting "clip-higher-0.2-0.28:loss.eps_high=0.28" \
  --setting "paper-0.15-off:loss.eps_low=0.15;loss.eps_high=null" \
  --setting "aggressive-0.05-0.2:loss.eps_low=0.05" \
  --setting "entropy_bonus:control.kind=entropy_bonus;control.target_ratio=0.8" \
  --setting "clip_cov:control.kind=clip_cov"

for study in rlvr_control rlvr_baselines; do
  mkdir -p "docs/results/$study"
  cp -r runs/study/$study/plots runs/study/$study/report.md runs/study/$study/summary.json "docs/results/$study/"
done
