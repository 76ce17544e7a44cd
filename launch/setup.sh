#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv:
#   bash launch/setup.sh
# Idempotent: reinstalls only when requirements*.txt / requirements.lock /
# pyproject.toml changed. Needs Python 3.11 with venv; torch/torchvision come
# from pip (on these machines, from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SAAT_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.saat-dist-installed"
want=$(cat requirements.txt requirements-dev.txt requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (first time: several minutes, ~6 GB for torch)"
  # pip names every configured index location missing on this machine, once
  # per package ("WARNING: Location ... is ignored"): not the install's concern
  quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }; }
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip
  # compiled at install (45 s of a 113 s install on 2 cores): where
  # PYTHONDONTWRITEBYTECODE is set, as on these machines, Python never caches a
  # module it compiles, and every process would compile torch again (measured:
  # --no-compile made the test suite 40 % slower)
  quiet "$VENV/bin/python" -m pip install -q -r requirements-dev.txt -c requirements.lock
  quiet "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi
# The package's own modules, compiled once here: PYTHONDONTWRITEBYTECODE (set
# on these machines) keeps Python from caching them, and every process (each
# Ray worker, each CLI) would compile them again (~0.25 s each); only changed
# files are recompiled.
"$VENV/bin/python" -m compileall -q -j 0 saat_dist >/dev/null
