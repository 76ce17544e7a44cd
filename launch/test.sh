#!/usr/bin/env bash
# The test suite, after setting up .venv if needed:
#   bash launch/test.sh [pytest args]
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
exec .venv/bin/python -m pytest -q "$@"
