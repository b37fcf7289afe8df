#!/usr/bin/env bash
# (ii) Both cross-objective continuations of a pair in one paired run: the encoder continues from the *decoder's*
# weights with MLM (15% masking) and the decoder from the *encoder's* weights with CLM, fresh optimizers
# (Ettin's "cross" phase, reference section 3), on the same batches.
#
#   bash experiments/cross_objective.sh demo runs/demo runs/demo-cross [--config.total_tokens=N]
#   bash experiments/cross_objective.sh 150m runs/p3   runs/cross150m      # Ettin's recipe: 50B tokens
#
# At demo size the cross run is the demo config with a budget of 60 steps' worth of tokens, its whole schedule
# (half the pretraining budget; Ettin's cross phase is ~3% of pretraining, but a 120-step model needs more steps to
# adapt). Extra arguments go to `ettin train`.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:?size: demo or one of 17m 32m 68m 150m 400m 1b}
FROM=${2:?the pair workdir to start from}
WORKDIR=${3:?workdir}
shift 3
if [[ "$SIZE" == demo ]]; then
  python -m ettin_jax.cli train --config=configs/demo.py --workdir="$WORKDIR" --config.phase=cross \
    --config.init_mode=weights --config.init_from="$FROM" --config.mlm_rate=0.15 --config.total_tokens=245760 "$@"
else
  python -m ettin_jax.cli train --config="configs/ettin.py:size=$SIZE,objective=paired,phase=cross" \
    --workdir="$WORKDIR" --config.init_from="$FROM" "$@"
fi
