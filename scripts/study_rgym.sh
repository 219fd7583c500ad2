#!/usr/bin/env bash
# Verifiable rewards on a reasoning-gym dataset (docs/results.md): basic_arithmetic (two terms of up to
# two digits, + and -) scored by reasoning-gym's score_answer, on the tiny model warmed up on the same
# dataset. Static (0.2, 0.2), the clip-low controller and the entropy-bonus controller, 3 seeds, 150 steps.
# Each run takes about 3 minutes on one free core. Re-running continues unfinished runs.
set -euo pipefail
ENTROCLIP=${ENTROCLIP:-.venv/bin/entroclip}
WORKERS=${WORKERS:-2}
RGYM_OPTIONS='{dataset: basic_arithmetic, size: 8000, eval_size: 1000, config: {min_terms: 2, max_terms: 2,
  min_digits: 1, max_digits: 2, operators: ["+", "-"], allow_negation: false, allow_parentheses: false}}'

[ -f runs/sft-rgym/model.safetensors ] ||
  "$ENTROCLIP" sft --out runs/sft-rgym --steps 3000 --task reasoning_gym --options "$RGYM_OPTIONS"

"$ENTROCLIP" sweep configs/study/rlvr_rgym.yaml --seeds 3 --workers "$WORKERS" --resume \
  --out runs/study/rgym --baseline static-0.2-0.2 \
  --setting "static-0.2-0.2:loss.eps_low=0.2" \
  --setting "clip_low-ctl-0.2:control.kind=clip_low;control.target_ratio=0.8;control.eps_low_min=0.05" \
  --setting "entropy_bonus:control.kind=entropy_bonus;control.target_ratio=0.8"

mkdir -p docs/results/rgym
cp -r runs/study/rgym/plots runs/study/rgym/report.md runs/study/rgym/summary.json docs/results/rgym/
