#!/usr/bin/env bash
# The random-reward clip study of docs/results.md: entropy drift per step as a function of eps_low at
# eps_high in {0.2, 0.28}, and of eps_high at eps_low = 0.2, on the SFT-warmed tiny model with
# Bernoulli(0.5) rewards that ignore the response (configs/study/random_reward.yaml), 5 seeds, 150 steps.
# Re-running continues unfinished runs (--resume) and rewrites the report and docs/results/ figures.
# Each run takes about a minute on one free core; WORKERS runs go in parallel.
set -euo pipefail
ENTROCLIP=${ENTROCLIP:-.venv/bin/entroclip}
WORKERS=${WORKERS:-2}

[ -f runs/sft/model.safetensors ] || "$ENTROCLIP" sft --out runs/sft

"$ENTROCLIP" sweep configs/study/random_reward.yaml --seeds 5 --workers "$WORKERS" --resume \
  --out runs/study/random --baseline "eps_low=0.2,eps_high=0.2" \
  --grid "loss.eps_low=0.05,0.1,0.2,0.3" --grid "loss.eps_high=0.2,0.28" \
  --setting "eps_low=0.2,eps_high=0.1:loss.eps_low=0.2;loss.eps_high=0.1" \
  --setting "eps_low=0.2,eps_high=0.4:loss.eps_low=0.2;loss.eps_high=0.4" \
  --setting "eps_low=0.2,eps_high=off:loss.eps_low=0.2;loss.eps_high=null"

mkdir -p docs/results/random
cp -r runs/study/random/plots runs/study/random/report.md runs/study/random/summary.json docs/results/random/

# The theory lab's prediction for the same bounds: a tabular softmax policy over the tiny model's 16
# tokens at its entropy (0.67 nats), the same groups, advantages, epochs and minibatches, PG and Adam.
: > runs/study/random/theory.jsonl
for bounds in "0.05 0.2" "0.1 0.2" "0.2 0.2" "0.3 0.2" "0.05 0.28" "0.1 0.28" "0.2 0.28" "0.3 0.28" \
              "0.2 0.1" "0.2 0.4" "0.2 none"; do
  read -r low high <<< "$bounds"
  for optimiser in pg adam; do
    "$ENTROCLIP" theory drift --eps-low "$low" --eps-high "$high" --optimiser "$optimiser" --n 16 \
      --entropy 0.67 --advantage drgrpo --prompts 16 --group-size 8 --mu 4 --minibatches 4 \
      --seeds 20000 --json >> runs/study/random/theory.jsonl
  done
done
cp runs/study/random/theory.jsonl docs/results/random/
"${PYTHON:-.venv/bin/python}" scripts/study_trend.py runs/study/random | tee docs/results/random/trend.txt
