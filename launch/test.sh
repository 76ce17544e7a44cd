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
# SAAT_DIST_TEST_PROCS=N: N test processes (pytest-xdist, default 2), each
# test module in one process (its fixtures built once), the Ray modules
# together and first (tests/conftest.py); 0 runs everything in this process.
# With more than one, torch uses one thread per process (OMP_NUM_THREADS=1
# unless set): two processes of two threads on 2 cores measured slower than
# one process, as their threads spin against each other.
procs=${SAAT_DIST_TEST_PROCS:-2}
if [ "$procs" -gt 0 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec .venv/bin/python -m pytest -q -n "$procs" --dist loadgroup --no-loadscope-reorder --durations=25 "$@"
fi
exec .venv/bin/python -m pytest -q --durations=25 "$@"
