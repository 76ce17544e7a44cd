#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv:
#   bash launch/setup.sh
# Idempotent: reinstalls only when requirements*.txt / requirements.lock /
# pyproject.toml changed. Needs Python 3.11 with venv; the packages come from
# the indexes pip is configured with (on these machines, local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SAAT_VENV:-.venv}
UV_VERSION=0.13.9  # the installer; SAAT_DIST_INSTALLER=pip uses pip alone

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  # Without ensurepip's pip (8.6 s here, against 0.2 s) where this interpreter's
  # pip can put uv into the venv: uv then installs the pinned pip with the rest
  # (0.7 s). The pip installer (and an interpreter without pip) gets it as before.
  if [ "${SAAT_DIST_INSTALLER:-uv}" = uv ] && "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m venv --without-pip "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
# pip names every configured index location missing on this machine, once
# per package ("WARNING: Location ... is ignored"): not the install's concern
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }; }
# the venv's pip, or (a venv made without pip) this interpreter's pip acting on it (pip >= 22.3)
venv_pip() {
  if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then "$VENV/bin/python" -m pip "$@"
  else "$PYTHON" -m pip --python "$VENV/bin/python" "$@"; fi
}

# uv with the index locations pip is configured with (pip.conf and PIP_*),
# all of them searched alike as pip does
uv_index_args() {
  local listed
  listed=$(venv_pip config list 2>/dev/null) || return 1
  "$VENV/bin/python" - "$listed" <<'PY'
import sys
listed = sys.argv[1]
opts = {}
for line in listed.splitlines():  # e.g. global.extra-index-url='a b'; the environment's (:env:.) come last and win
    key, _, value = line.partition("=")
    opts[key.split(".", 1)[-1]] = value.strip("'\"")
args = ["--index-strategy", "unsafe-best-match"]
if opts.get("index-url"):
    args += ["--index-url", opts["index-url"]]
for flag, key in (("--extra-index-url", "extra-index-url"), ("--find-links", "find-links")):
    for location in opts.get(key, "").split():
        args += [flag, location]
print("\n".join(args))  # one per line: read into an array, never through a shell
PY
}

install_with_uv() {
  if [ "$("$VENV/bin/uv" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
    quiet venv_pip install -q "uv==$UV_VERSION" || return 1
  fi
  local index
  mapfile -t index < <(uv_index_args) && [ "${#index[@]}" -gt 0 ] || return 1
  # no bytecode compiled here: see the warm-up below
  quiet "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${index[@]}" -r requirements-dev.txt -c requirements.lock \
    && quiet "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps --no-build-isolation -e .
}

install_with_pip() {
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip >/dev/null
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip
  quiet "$VENV/bin/python" -m pip install -q -r requirements-dev.txt -c requirements.lock
  quiet "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
}

# Bytecode for what the processes import, compiled once by importing it.
# Where PYTHONDONTWRITEBYTECODE is set (as on these machines) Python never
# caches a module it compiles, so every process (each Ray worker, each CLI)
# would compile torch, Ray and DeepSpeed again; compiling all 18,000 modules
# of the environment instead took 62 s on 2 cores, this 22 s that day. Two
# processes of about equal length: torch, dynamo and the package in one; Ray's
# own daemons, then DeepSpeed (its torch by then compiled by the other) in the
# other (10.9 s against 14.7 s with DeepSpeed in the first, measured side by
# side); a module already cached is not compiled again.
warm_up() {
  local training ray_side
  training=$(cat <<'PY'
import importlib, pkgutil, warnings
warnings.simplefilter("ignore")
import torch, torch._dynamo, torchvision.models, saat_dist
for module in pkgutil.walk_packages(saat_dist.__path__, "saat_dist."):
    importlib.import_module(module.name)
PY
)
  ray_side=$(cat <<'PY'
import importlib, warnings
warnings.simplefilter("ignore")
for name in ("ray.dashboard.dashboard", "ray.dashboard.agent", "ray._private.runtime_env.agent.main",
             "ray._private.log_monitor", "ray.autoscaler._private.monitor", "ray.train.torch", "deepspeed"):
    try:
        importlib.import_module(name)
    except (Exception, SystemExit):  # a module Ray runs as a script may exit on import; what it imported is cached
        pass
PY
)
  local run=(env -u PYTHONDONTWRITEBYTECODE DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" "$VENV/bin/python" -c)
  "${run[@]}" "$ray_side" & local ray_pid=$!
  "${run[@]}" "$training"
  wait "$ray_pid"
}

stamp="$VENV/.saat-dist-installed"
want=$(cat requirements.txt requirements-dev.txt requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (first time: a minute or several, ~6 GB for torch)"
  # uv installs the same pins as pip in about a fifth of the time (24 s
  # against 113 s here, docs/testing.md); pip remains the fallback
  if [ "${SAAT_DIST_INSTALLER:-uv}" = uv ] && install_with_uv; then :; else
    [ "${SAAT_DIST_INSTALLER:-uv}" = uv ] && echo "[setup] uv failed; installing with pip"
    install_with_pip
  fi
  echo "[setup] compiling what the processes import"
  warm_up
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi
# The package's own modules, compiled here on every call (only changed files
# are): without it each process would compile the changed ones again (~0.25 s
# each where PYTHONDONTWRITEBYTECODE is set).
"$VENV/bin/python" -m compileall -q -j 0 saat_dist >/dev/null
