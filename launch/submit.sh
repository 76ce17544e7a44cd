#!/usr/bin/env bash
# Send a saat-dist command to a Ray cluster with `ray job submit`:
#   RAY_ADDRESS=http://127.0.0.1:8265 bash launch/submit.sh run configs/demo.yaml [--set key=value ...]
#   RAY_ADDRESS=... bash launch/submit.sh experiment configs/experiments/demo.yaml
#   RAY_ADDRESS=... bash launch/submit.sh train configs/cluster-cpu.yaml --resume auto
# COMMAND is run, experiment or one stage (train, saat, evaluate, report);
# everything after CONFIG goes to that command.
# The working directory travels as the job's runtime_env (launch/job-runtime-env.yaml:
# the checkout without .git, data, run outputs, virtualenvs or caches; Ray's
# upload limit is ~100 MiB). Inside the job, saat-dist joins the cluster that
# runs it (RAY_ADDRESS is set there).
# Token auth: clusters started with RAY_AUTH_MODE=token need the same for this
# CLI (export RAY_AUTH_MODE=token and the token, see docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: submit.sh COMMAND CONFIG [args ...]  (COMMAND: run, experiment, train, saat, evaluate, report)"
command=${1:?$usage}
config=${2:?$usage}
shift 2
case "$command" in
  run|experiment|train|saat|evaluate|report) ;;
  *) echo "submit.sh: unknown command '$command'; $usage" >&2
     exit 2 ;;
esac
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
ray_bin=${RAY_BIN:-$(command -v ray || echo .venv/bin/ray)}
python_bin=${JOB_PYTHON:-python}
exec "$ray_bin" job submit --address "$address" --runtime-env launch/job-runtime-env.yaml ${SUBMIT_FLAGS:-} \
  -- "$python_bin" -m saat_dist.cli "$command" --config "$config" "$@"
