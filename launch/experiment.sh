#!/usr/bin/env bash
# The paper's whole protocol on the embedded data (every attack and defence,
# Tables I/II, plots), on this machine's CPU, after setting up .venv if needed:
#   bash launch/experiment.sh [configs/experiments/demo.yaml] [--set key=value ...]
# Results: runs/experiment-demo/experiment.md (and .json, plots/). A rerun
# skips what is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
config=configs/experiments/demo.yaml
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then config=$1; shift; fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/saat-dist experiment --config "$config" "$@"
