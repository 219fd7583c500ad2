#!/usr/bin/env bash
# The random-reward clip study on SmolLM2-135M-Instruct (docs/results.md): the three settings that isolate
# the paper's claims -- both bounds (0.2, 0.2), clip-low only (0.2, off) and clip-high only (off, 0.2) --
# one seed each, 25 GRPO steps on coin-flip rewards. Each run takes 10-20 minutes on one free core.
# Re-running continues unfinished runs and rewrites the report and the docs/results/ figures.
set -euo pipefail
ENTROCLIP=${ENTROCLIP:-.venv/bin/entroclip}
SEEDS=${SEEDS:-1}
WORKERS=${WORKERS:-1}

"$ENTROCLIP" sweep configs/study/smollm2_random.yaml --seeds "$SEEDS" --workers "$WORKERS" --resume \
  --out runs/study/smollm2 --baseline static-0.2-0.2 \
  --setting "static-0.2-0.2:loss.eps_low=0.2" \
  --setting "clip-low-only-0.2-off:loss.eps_high=null" \
  --setting "clip-high-only-off-0.2:loss.eps_low=null"

# The theory lab's drift for the same bounds: a tabular softmax over 1,000 actions (a stand-in for the
# model's 49,152-token vocabulary) at the model's rollout entropy (3.26 nats), the same groups, advantages,
# epochs and minibatches, PG and Adam.
: > runs/study/smollm2/theory.jsonl
for bounds in "0.2 0.2" "0.2 none" "none 0.2"; do
  read -r low high <<< "$bounds"
  for optimiser in pg adam; do
    "$ENTROCLIP" theory drift --eps-low "$low" --eps-high "$high" --optimiser "$optimiser" --n 1000 \
      --entropy 3.26 --init zipf --advantage drgrpo --prompts 4 --group-size 4 --mu 4 --minibatches 2 \
      --seeds 5000 --json >> runs/study/smollm2/theory.jsonl
  done
done

mkdir -p docs/results/smollm2
cp -r runs/study/smollm2/plots runs/study/smollm2/report.md runs/study/smollm2/summary.json \
  runs/study/smollm2/theory.jsonl docs/results/smollm2/
