"""Shared fixtures: tiny real data sets built once per test session."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The session's Ray runs on loopback only; drivers in subprocesses join it without a token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Every Ray the tests use is their own: never a cluster named by the shell.
os.environ.pop("RAY_ADDRESS", None)
# Ray Train's controller polls its workers every 2 s by default: a finished or
# failed worker group is seen that much later, and each checkpoint's
# ray.train.report waits for the next poll (its result queue holds one report;
# measured: 0.5 s per report at 0.5 s, 0.11 s at 0.1 s). 0.1 s in the tests
# (the clusters they start inherit it; drivers in subprocesses too).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import pytest
import torch

from saat_dist.data.demo import DemoSpec, build_demo

ROOT = Path(__file__).resolve().parents[1]
TINY = DemoSpec(train=240, query=60, database=300, seed=3, shard_size=20)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny multi-label demo data set (real MNIST mosaics) in shards."""
    out = tmp_path_factory.mktemp("tiny_demo")
    summary = build_demo(out, TINY)
    return out, summary


@contextlib.contextmanager
def one_ray_at_a_time(tmp_path_factory):
    """One Ray cluster at a time over the test processes (a file lock): the
    suite's two processes run the Ray modules in one and every other file,
    without Ray, in the other; a run of the files in any other split waits
    here rather than start a second cluster beside the first."""
    import ray
    from filelock import FileLock

    lock = FileLock(str(tmp_path_factory.getbasetemp().parent / "saat-dist-ray.lock"))
    lock.acquire(timeout=1800)
    try:
        if ray.is_initialized():  # started by a test that ran the CLI in this process
            ray.shutdown()
        yield
    finally:
        lock.release()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """A Ray cluster of a head (no CPUs: drivers, Ray Train's controller and
    the job API only) and 2 worker nodes of 1 CPU each, every node its own
    raylet and process (saat_dist.distributed.local_cluster), on 127.0.0.1;
    preempted nodes drain for 10 s. Started and stopped by the users'
    script, launch/local-cluster.sh; a driver joins it with ``--address``,
    ``ray job submit`` with ``cluster.dashboard``. One per session: the Ray
    modules share it (a cluster start is ~20 CPU-s: every node's raylet,
    agents and the head's dashboard); a test that loses nodes says what it
    leaves, and a module that needs two worker nodes adds what is missing
    (``two_worker_nodes``)."""
    import ray

    from saat_dist.distributed.local_cluster import LocalCluster

    state = tmp_path_factory.mktemp("cluster")
    script = [str(ROOT / "launch" / "local-cluster.sh")]
    with one_ray_at_a_time(tmp_path_factory):
        up = subprocess.run(["bash", *script, "up", "--state-dir", str(state), "--workers", "2", "--grace-s", "10"],
                            capture_output=True, text=True, timeout=300)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            cluster = LocalCluster.attach(state)
            assert json.loads(up.stdout)["address"] == cluster.address and cluster.workers == ["worker-1", "worker-2"]
            yield cluster
        finally:
            ray.shutdown()
            down = subprocess.run(["bash", *script, "down", "--state-dir", str(state)], capture_output=True,
                                  text=True, timeout=300)
            assert down.returncode == 0, down.stdout + down.stderr
            assert not list(state.glob("*.json")), "a node outlived `down`"


def two_worker_nodes(cluster) -> None:
    """Add worker nodes until ``cluster`` has 2 (a test before may have lost one)."""
    while len(cluster.workers) < 2:
        cluster.add_node()


@contextlib.contextmanager
def slowed(pids, share: float = 0.2, period_s: float = 0.2):
    """The processes ``pids`` run ``share`` of every ``period_s`` and are
    stopped the rest (SIGSTOP and SIGCONT, as cpulimit does): a machine
    5x slower, for as long as the block lasts. A process that has gone is
    passed over; every one is continued at the end."""
    done = threading.Event()

    def send(sig):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def cycle():
        while not done.is_set():
            send(signal.SIGCONT)
            time.sleep(share * period_s)
            send(signal.SIGSTOP)
            done.wait((1 - share) * period_s)
        send(signal.SIGCONT)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def fresh_driver() -> None:
    """Leave the Ray this process joined: the CLI keeps a Ray its process
    already joined (``init_ray``), and with it the job environment of the
    command that joined it (a preemption watcher, say), so a module's first
    command joins anew with its own."""
    import ray

    ray.shutdown()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_small(tiny_demo):
    """A small CNN hash model trained a little on the tiny demo: (model, splits)."""
    from saat_dist.data.stream import load_split
    from saat_dist.hashing import DPHLoss
    from saat_dist.mainstay import CodeBank
    from saat_dist.models import build_hash_model
    from saat_dist.training import TorchStepper, benign_step

    shard_dir = tiny_demo[1]["shard_dir"]
    splits = {s: load_split(shard_dir, s, 32) for s in ("train", "test", "database")}
    x, y, idx = splits["train"]
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", 16, width=16)
    bank = CodeBank(y, 16)
    stepper = TorchStepper(torch.optim.Adam(model.parameters(), lr=3e-3))
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        b = torch.randperm(len(x), generator=g)[:48]
        benign_step(model, stepper, (x[b].float() / 255, y[b], idx[b]), bank, DPHLoss(), step)
    model.eval()
    return model, splits


def need(available: bool, what: str) -> None:
    """Skip a test whose outside tool or file is missing, saying why; under
    CI (SAAT_DIST_CI=1, set by .ci/run) fail instead, so CI always runs it."""
    if available:
        return
    if os.environ.get("SAAT_DIST_CI") == "1":
        pytest.fail(f"CI must run this test, but {what}")
    pytest.skip(what)
