#!/usr/bin/env bash
# The main job on its embedded default: train the demo pair (an MLM encoder and a CLM decoder on the very same
# batches of the bundled corpus), export both to Hugging Face folders, and read them back through transformers.
# About 2 minutes on 2 idle CPU cores (1m48s and 2m04s measured on fresh clones, with the install). Rerunning resumes (or, when complete, skips straight to the export).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/demo}
ettin train --config=configs/demo.py --workdir="$WORKDIR"
ettin export --workdir="$WORKDIR" --out="$WORKDIR/hf"
python experiments/hf_readback.py "$WORKDIR/hf"
