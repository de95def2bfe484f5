#!/usr/bin/env bash
# Reproduces the shipped hierarchical weights (learnedopt/pretrained/hierarchical-ensemble.safetensors) and the
# evaluation in docs/hierarchical.md (CPU, one thread: ~65 min of meta-training, ~15 min of evaluation).
# SKIP_TRAIN=1 re-runs only the evaluation of the installed weights.
# Run from the repository root after the README's install command.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${SKIP_TRAIN:-0}" != 1 ]]; then
  python -m learnedopt meta-train --config configs/hierarchical-ensemble.json --out runs/hierarchical-ensemble
  # ship the weights with the best evaluation score (mean log loss ratio on 24 fixed ensemble trajectories)
  python -m learnedopt export runs/hierarchical-ensemble/best.pt learnedopt/pretrained/hierarchical-ensemble.safetensors
  mkdir -p docs/logs docs/figures
  cp runs/hierarchical-ensemble/log.jsonl docs/logs/hierarchical-ensemble.log.jsonl
  cp runs/hierarchical-ensemble/curves.png docs/figures/hierarchical-ensemble-meta-training.png
fi

python docs/eval_hierarchical.py --weights learnedopt/pretrained/hierarchical-ensemble.safetensors --out docs/eval/hierarchical
