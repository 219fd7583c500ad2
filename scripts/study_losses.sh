#!/usr/bin/env bash
# Which clipping schemes bias entropy, and which way (docs/results.md): the random-reward study of
# configs/study/random_reward.yaml with one row per loss.kind at its published parameters, against PPO's
# (0.2, 0.2), 5 seeds, 150 steps, the counterfactual clip probe every 5 steps. Rewards ignore the
# response, so any entropy drift comes from the loss. Then the same kinds under verifiable rewards:
# configs/study/rlvr_addition.yaml (2-digit addition, exact match), 3 seeds.
# Re-running continues unfinished runs (--resume).
set -euo pipefail
ENTROCLIP=${ENTROCLIP:-.venv/bin/entroclip}
WORKERS=${WORKERS:-2}

# one row per loss.kind at its published parameters
KINDS=(
  --setting "ppo:loss.kind=ppo;loss.eps_low=0.2;loss.eps_high=0.2"
  --setting "gspo:loss.kind=gspo;loss.eps_low=3.0e-4;loss.eps_high=4.0e-4;loss.agg=seq-mean-token-mean"
  --setting "cispo:loss.kind=cispo;loss.eps_low=null;loss.eps_high=4.0"
  --setting "sapo:loss.kind=sapo;loss.agg=seq-mean-token-mean"
  --setting "ce_gppo:loss.kind=ce_gppo;loss.eps_low=0.2;loss.eps_high=0.2;loss.beta1=0.75;loss.beta2=1.0"
)

[ -f runs/sft/model.safetensors ] || "$ENTROCLIP" sft --out runs/sft

"$ENTROCLIP" sweep configs/study/random_reward.yaml --seeds 5 --workers "$WORKERS" --resume \
  --out runs/study/losses --baseline ppo \
  "${KINDS[@]}"

"$ENTROCLIP" sweep configs/study/rlvr_addition.yaml --seeds 3 --workers "$WORKERS" --resume \
  --out runs/study/losses_rlvr --baseline ppo \
  "${KINDS[@]}"

for study in losses losses_rlvr; do
  mkdir -p "docs/results/$study"
  cp -r runs/study/$study/plots runs/study/$study/report.md runs/study/$study/summary.json "docs/results/$study/"
  # every run's per-step metrics, compressed
  tar -czf "docs/results/$study/metrics.tar.gz" -C runs/study/$study $(cd runs/study/$study && ls -d */seed*/metrics.jsonl)
done
