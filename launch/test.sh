#!/usr/bin/env bash
# The test suite, after setting up .venv if needed:
#   bash launch/test.sh [pytest args]          (-m "not slow": the fast tier)
# The monitoring test runs a real Prometheus server: Debian's `prometheus`
# package is installed here when missing and apt is usable (root or
# passwordless sudo, ~10 s); without it that test is skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
# apt beside the set-up (it waits on disk and the package index, the set-up on
# unpacking and compiling): ~10 s less before the tests start where it installs
apt_pid=""
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
  echo "[test] installing Debian's prometheus package for the monitoring test"
  { apt_install || { $sudo apt-get update -q >/dev/null && apt_install; } \
    || echo "[test] could not install prometheus; the test that needs it will be skipped"; } &
  apt_pid=$!
fi
bash launch/setup.sh
[ -z "$apt_pid" ] || wait "$apt_pid" || true
echo "[test] set-up: ${SECONDS} s"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# Every module a test process compiles is cached (setup.sh compiled the common
# ones): the suite starts ~100 Python processes (Ray's daemons and workers,
# spawned CLIs), and where PYTHONDONTWRITEBYTECODE is set each would compile
# what it imports again.
unset PYTHONDONTWRITEBYTECODE
# The whole suite (no arguments) runs as two pytest processes side by side,
# one torch thread each (they share the 2 cores): the Ray modules (a local
# multi-node cluster, Ray Train jobs: they wait on node starts, worker groups
# and checkpoints) in one, the other files without Ray in the other. Then
# each takes the next of the SHARED files, heaviest first, until none is
# left (one pytest run a file, claimed with an atomic mkdir): the two end
# close together whatever the machine's speed. A static split could not: the
# Ray side's waits do not scale with the machine, its compute does (fresh
# clones: at fe1ac46 the Ray side ended 111 s first; with the scale-invariance
# and certify files moved to it, at d78df9e 21 s last and at 87ffdea, on a
# faster machine, 58 s last). Any argument (a file, -k, -m "not slow") runs
# one process; SAAT_DIST_TEST_PROCS=1 (or 0) forces one.
RAY_SIDE=(tests/test_pipeline.py tests/test_distributed.py)
# heaviest first (at 76911c8: 65, 47, 33, 26 and 15 s): the last ones taken are short
SHARED=(tests/test_paper_presets.py tests/test_scale_invariance.py tests/test_experiment.py tests/test_deepspeed.py
        tests/test_certify_stage.py)
if [ "$#" -gt 0 ] || [ "${SAAT_DIST_TEST_PROCS:-2}" -le 1 ]; then
  exec .venv/bin/python -m pytest -q --durations=25 "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# all under one directory: the Ray modules' lock (tests/conftest.py) lives beside them
tmp=$(mktemp -d "${TMPDIR:-/tmp}/saat-dist-tests.XXXXXX")
mkdir "$tmp/claimed"
others=()
for f in tests/test_*.py; do
  case " ${RAY_SIDE[*]} ${SHARED[*]} " in *" $f "*) ;; *) others+=("$f") ;; esac
done
# the shared files this side gets to, one pytest run each (CACHE: its pytest
# cache option); the status: the worst
take_shared() {
  local f name status=0
  for f in "${SHARED[@]}"; do
    name=$(basename "$f" .py)
    mkdir "$tmp/claimed/$name" 2>/dev/null || continue
    echo "----- $f"
    .venv/bin/python -m pytest -q --durations=5 --basetemp "$tmp/$name" ${CACHE:-} "$f" || status=1
  done
  return "$status"
}
side() {  # pytest on this side's own files, then shared files
  local status=0
  .venv/bin/python -m pytest -q --durations=15 ${CACHE:-} "$@" || status=1
  take_shared || status=1
  return "$status"
}
echo "[test] two processes: ${RAY_SIDE[*]} | the other ${#others[@]} files; then each takes the next of" \
     "${SHARED[*]} (logs under $tmp)"
# one side keeps pytest's cache (--lf), its runs one after another: two sides
# would overwrite each other's record
CACHE="-p no:cacheprovider" side --basetemp "$tmp/ray" "${RAY_SIDE[@]}" > "$tmp/ray.log" 2>&1 &
ray_pid=$!
side --basetemp "$tmp/others" "${others[@]}" > "$tmp/others.log" 2>&1 &
others_pid=$!
# Stopped (INT, TERM): each side is a subshell, so its pytest is signalled by
# parent id; a pytest that joined Ray may not stop on a signal (Ray handles
# them in its drivers), so what is left after 5 s is killed, and a local
# cluster of the suite taken down by its state directory.
stop_all() {
  pkill -TERM -P "$ray_pid,$others_pid" 2>/dev/null || true
  kill "$ray_pid" "$others_pid" 2>/dev/null || true
  sleep 5
  pkill -KILL -f -- "--basetemp $tmp/" 2>/dev/null || true
  local d
  for d in "$tmp"/*/cluster[0-9]*; do
    [ -d "$d" ] && bash launch/local-cluster.sh down --state-dir "$d" >/dev/null 2>&1 || true
  done
}
trap stop_all INT TERM
status=0
wait "$others_pid" || status=$?
echo "===== the other files, then shared ones ====="; cat "$tmp/others.log"
wait "$ray_pid" || status=$?
echo "===== ${RAY_SIDE[*]}, then shared ones ====="; cat "$tmp/ray.log"
for f in "${SHARED[@]}"; do  # each ran once (a side that died early leaves the rest to the other)
  [ -d "$tmp/claimed/$(basename "$f" .py)" ] || { echo "[test] $f did not run"; status=1; }
done
if [ "$status" = 0 ]; then echo "[test] both processes passed"; rm -rf "$tmp"; else echo "[test] FAILED (exit $status); its files: $tmp"; fi
exit "$status"
