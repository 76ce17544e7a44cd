#!/usr/bin/env bash
# Certified robustness of the demo's models (issue 20): benign, SAAT, Gaussian
# noise and SAAT + noise, trained first when missing, then center-smoothed
# certificates per l2 radius; runs/certify-demo/certify.md and plots/.
#   bash launch/certify.sh [CONFIG] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
config=configs/certify/demo.yaml
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then config=$1; shift; fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/saat-dist certify --config "$config" "$@"
