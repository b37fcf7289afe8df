#!/usr/bin/env bash
# The miniature Ettin study (issue 26) in one command: check the task files, pretrain the pair (an MLM encoder and
# a CLM decoder on the same batches, same init, 6M tokens each; configs/study.py), continue both cross-objective
# (1.2M tokens), evaluate the models on the study's tasks (LR grid x 3 seeds chosen on dev, paired tests on the
# same test items) and write report.md, results.json and the plots (losses.png, scores.png, gaps.png).
#
#   bash experiments/study.sh [RUNS=runs/study] [OUT=experiments/results/study]
#   bash experiments/study.sh --smoke [RUNS=runs/study-smoke] [OUT=RUNS/report]   # tiny budgets: the plumbing only
#
# Rerunning resumes: training from each workdir's last checkpoint (a finished run is skipped), evaluation from
# RUNS/cache/ (one file per model and task, written after every fine-tuning run). A missing or malformed task file
# stops it, named in one line (exit 2), before any training. Wall time per stage is added up in RUNS/timings.tsv
# and reported.
# Budget, for 60 minutes on 2 CPU cores (measured idle on this project's AMD EPYC, float32, 2026-12-03): the pair
# trains at ~6.5k tokens/s per model, so pretraining 6M tokens takes ~15 min and the cross phase ~3 min; one
# fine-tuning run of a sentence task (600 examples x 2 epochs, then dev and test scored) ~15-20 s, a contrastive run
# 20-40 s, an encoder's pseudo-log-likelihood pass over the three choice tasks ~2.5 min; evaluation ~30 min in all
# (Budget in ettin_jax/evaluation/study.py; each model only on the tasks its comparisons need).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
if [[ "${1:-}" == --smoke ]]; then SMOKE=1; shift; fi
RUNS=${1:-runs/study${SMOKE:+-smoke}}
OUT=${2:-${SMOKE:+$RUNS/report}}
OUT=${OUT:-experiments/results/study}
TASKS=${STUDY_TASKS:-data/eval/study}  # the task files' folder (tests point it at broken copies)
COMMAND="bash experiments/study.sh${SMOKE:+ --smoke} $*"
mkdir -p "$RUNS"
timed() {  # timed STAGE CMD...: run CMD, add its wall seconds to RUNS/timings.tsv
  local stage=$1 start end
  shift
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  echo "$stage $(awk "BEGIN {print $end - $start}")" >> "$RUNS/timings.tsv"
}
CFG="configs/study.py:corpus=$RUNS/corpus${SMOKE:+,smoke}"
timed prepare python experiments/study.py prepare --runs="$RUNS" --tasks="$TASKS" ${SMOKE:+--smoke}
timed pretrain python -m ettin_jax.cli train --config="$CFG" --workdir="$RUNS/pair"
timed cross python -m ettin_jax.cli train --config="$CFG,phase=cross" --workdir="$RUNS/cross" \
  --config.init_from="$RUNS/pair"
timed evaluate python experiments/study.py finish --runs="$RUNS" --out="$OUT" --tasks="$TASKS" ${SMOKE:+--smoke} --command="$COMMAND" \
  --machine="$(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
