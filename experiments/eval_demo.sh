#!/usr/bin/env bash
# The whole chain at demo scale: pretrain the demo pair, continue both cross-objective, evaluate all four models and
# write the comparison report (report.md, results.json, losses.png, scores.png).
#
#   bash experiments/eval_demo.sh [RUNS_DIR=runs] [OUT=experiments/results/demo]
#
# The whole chain took 6m48s on 2 idle CPU cores (training ~2.5 min, evaluation 4.2 min; experiments/results/README.md).
# Reruns resume training.
set -euo pipefail
NOTE="This is a smoke test of the evaluation machinery, not the study: models pretrained for 2 minutes (stopped at \
the unigram plateau), small task sets, one seed, so no comparison here can separate encoder and decoder. The \
miniature Ettin study, powered and with paired tests, is bash experiments/study.sh (issue 26)."
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
OUT=${2:-experiments/results/demo}
bash experiments/pretrain_pair.sh demo "$RUNS/demo"
bash experiments/cross_objective.sh demo "$RUNS/demo" "$RUNS/demo-cross"
# Demo-scale budgets (those of the committed report, experiments/results/README.md): classification 3 epochs at
# LR 1e-3 and 96 tokens, 60 contrastive steps at 1e-3, the first 100 items of each multiple-choice task.
python experiments/compare.py --out="$OUT" --lrs=1e-3 --epochs=3 --max_len=96 --contrastive_lr=1e-3 \
  --contrastive_steps=60 --query_len=32 --doc_len=96 --limit=100 \
  "$RUNS/demo" "$RUNS/demo-cross" --command="bash experiments/eval_demo.sh $RUNS $OUT" \
  --note="$NOTE"
cp "$RUNS/demo/metrics.jsonl" "$OUT/metrics_pair.jsonl"
cp "$RUNS/demo-cross/metrics.jsonl" "$OUT/metrics_cross.jsonl"
