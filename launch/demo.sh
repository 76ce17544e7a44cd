#!/usr/bin/env bash
# The main job on the embedded default data, end to end, on this machine's CPU:
#   bash launch/demo.sh [--set key=value ...]
# Sets up .venv if needed, builds the demo data on first use, then runs
# benign training -> evaluation -> SAAT -> evaluation -> report (runs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/saat-dist run --config configs/demo.yaml "$@"
