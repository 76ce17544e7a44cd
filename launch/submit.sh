#!/usr/bin/env bash
# Send a run (or an experiment) to a Ray cluster with `ray job submit`:
#   RAY_ADDRESS=http://127.0.0.1:8265 bash launch/submit.sh configs/demo.yaml [--set key=value ...]
#   RAY_ADDRESS=... bash launch/submit.sh configs/experiments/demo.yaml      # saat-dist experiment
# The command is `experiment` for configs under configs/experiments/ or
# configs/paper/, else `run`; SAAT_COMMAND chooses it (run, experiment, or one
# stage: train, saat, evaluate, report).
# The working directory travels as the job's runtime_env, without .git, data,
# run outputs, virtualenvs or caches (Ray's upload limit is ~100 MiB). Inside
# the job, saat-dist joins the cluster that runs it (RAY_ADDRESS is set there).
# Token auth: clusters started with RAY_AUTH_MODE=token need the same for this
# CLI (export RAY_AUTH_MODE=token and the token, see README "Run on a cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: submit.sh CONFIG [--set key=value ...]}
shift
case "$config" in
  */experiments/*|*/paper/*) default_command=experiment ;;
  *) default_command=run ;;
esac
command=${SAAT_COMMAND:-$default_command}
case "$command" in
  run|experiment|train|saat|evaluate|report) ;;
  *) echo "submit.sh: SAAT_COMMAND must be run, experiment, train, saat, evaluate or report, got '$command'" >&2
     exit 2 ;;
esac
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
ray_bin=${RAY_BIN:-$(command -v ray || echo .venv/bin/ray)}
python_bin=${JOB_PYTHON:-python}
runtime_env=$(cat <<JSON
{"working_dir": ".",
 "excludes": [".git", ".venv", "data", "runs", "bench-results", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"],
 "env_vars": {"PYTHONUNBUFFERED": "1"}}
JSON
)
exec "$ray_bin" job submit --address "$address" --runtime-env-json "$runtime_env" ${SUBMIT_FLAGS:-} \
  -- "$python_bin" -m saat_dist.cli "$command" --config "$config" "$@"
