#!/usr/bin/env bash
# The test suite, after setting up .venv if needed:
#   bash launch/test.sh [pytest args]          (-m "not slow": the fast tier)
# The monitoring test runs a real Prometheus server: Debian's `prometheus`
# package is installed here when missing and apt is usable (root or
# passwordless sudo, ~10 s); without it that test is skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
  echo "[test] installing Debian's prometheus package for the monitoring test"
  apt_install || { $sudo apt-get update -q >/dev/null && apt_install; } \
    || echo "[test] could not install prometheus; the test that needs it will be skipped"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# SAAT_DIST_TEST_PROCS=N: N test processes (pytest-xdist), a test file
# per process at a time (a file's Ray cluster and fixtures stay in one process);
# 0 (the default) runs in this one: on 2 cores two processes measured no faster.
procs=${SAAT_DIST_TEST_PROCS:-0}
if [ "$procs" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -n "$procs" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -q --durations=25 "$@"
