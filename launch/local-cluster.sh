#!/usr/bin/env bash
# A Ray cluster of a head and worker nodes on this one machine, to try
# multi-node runs, node loss and preemption without a second machine.
#   bash launch/local-cluster.sh up [--workers 2] [--cpus-per-node 1] [--grace-s 30]
#   bash launch/local-cluster.sh status
#   bash launch/local-cluster.sh preempt --node worker-1   # SIGTERM: drains with its grace, then goes
#   bash launch/local-cluster.sh kill --node worker-2      # SIGKILL: the node is lost
#   bash launch/local-cluster.sh add-node
#   bash launch/local-cluster.sh down                      # stops every node it started (by process id)
# Every node is a process of ours with its own raylet; all bind 127.0.0.1.
# State and logs: runs/local-cluster/ (--state-dir to change). Join it with
#   .venv/bin/saat-dist run --config configs/demo.yaml --address <address printed by up>
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh >/dev/null
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # loopback only: nothing outside this machine can reach it
exec .venv/bin/saat-dist cluster "$@"
