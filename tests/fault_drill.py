"""Fault drill on the demo config, by hand (minutes; not a test): a 3-node
local Ray cluster (a head and 2 worker nodes of 1 CPU), the demo's benign
model trained once, then its SAAT stage run uninterrupted and three times
more, each with one fault at 40 % of its steps (mid-epoch):

- ``node_lost``: a worker node SIGKILLed; a node added back 5 s later;
- ``preempted``: SIGTERM to a worker node (it drains with a ``--grace-s``
  deadline, every rank checkpoints at once, the node goes at the deadline);
  a node added back once it is gone;
- ``head_lost``: the driver SIGKILLed and the head taken down with every
  node; a new cluster, the same command again (resume: auto).

For each: the time to recover (the fault to the restarted group's first
progress report), the steps redone (steps done before the fault, as rank 0's
Prometheus endpoint last showed them, less the step the new group restored)
and max |dtheta| against the uninterrupted run. Writes
``<out>/drill.json``.

    DS_ACCELERATOR=cpu .venv/bin/python tests/fault_drill.py [--out runs/fault-drill] [--grace-s 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
SETS = ["resume=auto", "distributed.placement_strategy=SPREAD", "distributed.preemption_poll_s=1.0",
        "log_every_s=1", "distributed.max_failures=3", "distributed.preemption_notices=true"]


def _argv(out: Path, run: str, address: str, command: str) -> list[str]:
    sets = [f"output_dir={out / run}", f"data.shard_dir={out / 'data' / 'shards'}", *SETS]
    return [sys.executable, "-m", "saat_dist.cli", command, "--config", "configs/demo.yaml", "--address", address,
            *[a for s in sets for a in ("--set", s)]]


def _spawn(argv, log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def _rank0(run: Path) -> dict | None:
    """Rank 0's metrics endpoint now: its pid and the SAAT steps its process did."""
    from saat_dist.monitoring.prometheus import read_target_file

    try:
        t = read_target_file(run / "metrics" / "saat-rank0.json")
        text = urllib.request.urlopen(f"http://{t['host']}:{t['port']}/metrics", timeout=2).read().decode()
    except Exception:
        return None
    steps = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("saat_steps_total{")]
    return {"pid": t["pid"], "steps": int(steps[0]) if steps else 0}


def _params(run: Path) -> dict:
    import torch

    return torch.load(run / "saat" / "model.pt", weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _watch_until(run: Path, pred, timeout: float = 900) -> dict | None:
    """Poll rank 0 every 0.2 s until ``pred(snapshot)``; returns the last snapshot seen."""
    last, end = None, time.monotonic() + timeout
    while time.monotonic() < end:
        snap = _rank0(run)
        if snap is not None:
            last = snap
        if pred(snap, last):
            return last
        time.sleep(0.2)
    raise TimeoutError(f"{run}: no progress")


def drill(out: Path, grace_s: float, at: float = 0.4, faults=("node_lost", "preempted", "head_lost")) -> dict:
    from saat_dist.distributed.local_cluster import LocalCluster

    out.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster.start(out / "cluster", workers=2, grace_s=grace_s)
    results: dict = {"grace_s": grace_s, "config": "configs/demo.yaml", "sets": SETS, "fault_at": at}
    try:
        t = time.monotonic()
        if not (out / "reference" / "saat" / "model.pt").is_file():  # the uninterrupted run, once per --out
            assert _spawn(_argv(out, "reference", cluster.address, "train"), out / "reference.log").wait() == 0
            assert _spawn(_argv(out, "reference", cluster.address, "saat"), out / "reference.log").wait() == 0
            results["reference_seconds"] = round(time.monotonic() - t, 1)
        total = json.loads((out / "reference" / "saat" / "train.json").read_text())["steps"]
        reference = _params(out / "reference")
        for fault in faults:
            run = out / fault
            shutil.rmtree(run, ignore_errors=True)
            (run / "benign").mkdir(parents=True)
            shutil.copy(out / "reference" / "benign" / "model.pt", run / "benign" / "model.pt")
            log = out / f"{fault}.log"
            proc = _spawn(_argv(out, fault, cluster.address, "saat"), log)
            first = _watch_until(run, lambda s, last: s is not None and s["steps"] >= int(total * at))
            row = {}
            if fault == "node_lost":
                before, t_fault = _rank0(run), time.monotonic()
                cluster.kill(cluster.workers[-1])
                time.sleep(5.0)
                cluster.add_node()
            elif fault == "preempted":
                t_fault = time.monotonic()
                cluster.preempt(cluster.workers[0])
                # the group runs on to the deadline: the last steps rank 0 showed before it went
                before = _watch_until(run, lambda s, last: s is None or s["pid"] != first["pid"])
                cluster.wait_gone(cluster.workers[0], 120)
                cluster.add_node()
                row["deadline_reached_s"] = round(time.monotonic() - t_fault, 1)
            else:
                before, t_fault = _rank0(run), time.monotonic()
                os.killpg(proc.pid, 9)
                proc.wait()
                cluster.restart(workers=2)
                proc = _spawn(_argv(out, fault, cluster.address, "saat"), log)
            _watch_until(run, lambda s, last: s is not None and s["pid"] != first["pid"] and s["steps"] > 0)
            row["time_to_recover_s"] = round(time.monotonic() - t_fault, 1)
            assert proc.wait() == 0, f"{fault}: see {log}"
            train = json.loads((run / "saat" / "train.json").read_text())
            row.update({"steps_before_fault": before["steps"], "restored_step": train["resumed_from_step"],
                        "steps_redone": before["steps"] - train["resumed_from_step"], "total_steps": total,
                        "max_abs_dtheta": _max_diff(reference, _params(run))})
            results[fault] = row
            print(fault, row, flush=True)
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        cluster.stop()
    path = out / "drill.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**earlier, **results}, indent=1))
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fault-drill")
    p.add_argument("--grace-s", type=float, default=10.0)
    p.add_argument("--at", type=float, default=0.4, help="the fault when this share of the steps is done (mid-epoch)")
    p.add_argument("--faults", nargs="+", default=["node_lost", "preempted", "head_lost"])
    a = p.parse_args()
    print(json.dumps(drill(a.out.resolve(), a.grace_s, a.at, a.faults), indent=1))
