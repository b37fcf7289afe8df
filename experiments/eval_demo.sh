#!/usr/bin/env bash
# The whole chain at demo scale: pretrain the demo pair, continue both cross-objective, evaluate all four models and
# write the comparison report (report.md, results.json, losses.png, scores.png).
#
#   bash experiments/eval_demo.sh [RUNS_DIR=runs] [OUT=experiments/results/demo]
#
# On 2 otherwise idle CPU cores: pair ~5-8 min, cross ~3-4 min, evaluation ~10-15 min. Reruns resume/skip training.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
OUT=${2:-experiments/results/demo}
bash experiments/pretrain_pair.sh demo "$RUNS/demo"
bash experiments/cross_objective.sh demo "$RUNS/demo" "$RUNS/demo-cross"
# Demo-scale fine-tuning budgets: 3 epochs of classification at 96 tokens, 60 contrastive steps.
python experiments/compare.py --out="$OUT" --epochs=3 --max_len=96 --contrastive_steps=60 \
  "$RUNS/demo" "$RUNS/demo-cross" --command="bash experiments/eval_demo.sh $RUNS $OUT"
cp "$RUNS/demo/metrics.jsonl" "$OUT/metrics_pair.jsonl"
cp "$RUNS/demo-cross/metrics.jsonl" "$OUT/metrics_cross.jsonl"
