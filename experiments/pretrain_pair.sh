#!/usr/bin/env bash
# (i) A paired pretraining run at any size: an MLM encoder and a CLM decoder on the very same batches.
#
#   bash experiments/pretrain_pair.sh demo  runs/demo          # configs/demo.py: 4 layers x 128, 120 steps (CPU)
#   bash experiments/pretrain_pair.sh 17m   runs/p17m runlocal # Ettin's 17m recipe shrunk to a CPU run
#   bash experiments/pretrain_pair.sh 150m  /mnt/B/p150m       # the real thing (TPU/GPU), 1.7T tokens; a bucket
#                                                              # mounted with gcsfuse (docs/scaling.md)
#
# Extra arguments after the workdir go to `ettin train` (e.g. --config.total_tokens=N: a smaller budget, the
# whole schedule; --config.total_steps=N stops at step N with the schedule unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:?size: demo or one of 17m 32m 68m 150m 400m 1b tiny}
WORKDIR=${2:?workdir}
shift 2
if [[ "$SIZE" == demo ]]; then
  CONFIG=configs/demo.py
else
  EXTRA=""
  if [[ "${1:-}" == runlocal ]]; then EXTRA=",runlocal"; shift; fi
  CONFIG="configs/ettin.py:size=$SIZE,objective=paired,phase=pretrain$EXTRA"
fi
python -m ettin_jax.cli train --config="$CONFIG" --workdir="$WORKDIR" "$@"
