"""A Ray cluster of several nodes on this one machine: a head and worker
nodes, each with its own raylet, object store and resources, each one a
process of ours that the caller starts and stops by its id.

It is how the tests and ``launch/local-cluster.sh`` try multi-node
behaviour without a second machine: workers placed on different nodes,
shards read over HTTP, a node lost (its process SIGKILLed: a reaper takes its
raylet and workers with it), a node preempted (SIGTERM: the node asks Ray to
drain it with a deadline ``grace_s`` ahead, as a cloud's spot notice or a
Kubernetes pod's preStop hook does, and goes down when the deadline passes),
and a head that goes down with everything on it.

Every port is chosen free by Ray and bound to 127.0.0.1; the head's dashboard
(Ray's job API) listens on 127.0.0.1 only. A node process writes
``<state_dir>/<name>.json`` ({pid, node_id, address, dashboard}) once its
raylet is up, and removes it when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from saat_dist.distributed.preemption import drain

log = logging.getLogger("saat_dist")

LOOPBACK = "127.0.0.1"


# --------------------------------------------------------- one node process
def _start_node(name: str, head: bool, address: str | None, num_cpus: float, temp_dir: str | None):
    """A Ray node in this process: its raylet and daemons are children that
    the kernel ends with it (Ray's fate sharing on Linux); the raylet's
    agents, which outlived a node's stop, go with the rest of the group
    (``_kill_the_rest_of_my_group``)."""
    import ray._private.node
    from ray._private.parameter import RayParams

    # dashboard_agent_listen_port None: every node's agent (the head's holds the job API) on a free
    # port, not Ray's fixed 52365, which a Ray started on this machine before or after (ray.init,
    # another local cluster going down) may hold: seen, a new head's agent then serves no job API
    params = RayParams(node_ip_address=LOOPBACK, num_cpus=num_cpus, num_gpus=0, min_worker_port=0,
                       max_worker_port=0, object_store_memory=150 * 2**20, temp_dir=temp_dir,
                       dashboard_agent_listen_port=None,
                       # Nodes on one machine share the session directory. Each runtime-env agent
                       # unpacks a job's working_dir with overwrite (rmtree, then unzip) the first time
                       # one of its workers needs it; in a shared runtime_resources/ a worker node
                       # starting the job's workers deleted the files under the running driver (seen:
                       # "No module named saat_dist.distributed.ray_trainer"). One folder per node, as
                       # on a real cluster.
                       runtime_env_dir_name=f"runtime_resources_{name}")
    if head:
        # a node whose raylet stops answering is declared dead after 3 missed 1 s health checks (Ray's
        # defaults: 5 x 3 s), so a lost node shows in seconds, as the tests and try-outs want
        params.update(include_dashboard=True, dashboard_host=LOOPBACK, dashboard_port=0, gcs_server_port=0,
                      _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
    else:
        # one log monitor per machine (the head's); Ray picks free ports
        params.update(gcs_address=address, include_log_monitor=False, node_manager_port=0)
    return ray._private.node.Node(params, head=head, shutdown_at_exit=True, spawn_reaper=True)


def node_main(argv: list[str] | None = None) -> None:
    """``python -m saat_dist.distributed.local_cluster --state-dir D --name N
    [--head | --address A] [--num-cpus C] [--grace-s G]``: run one node until
    SIGINT (stop now), SIGTERM (preempted: drain, then stop when ``grace_s``
    has passed) or SIGKILL."""
    p = argparse.ArgumentParser(prog="saat_dist.distributed.local_cluster")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--head", action="store_true")
    p.add_argument("--address")
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--grace-s", type=float, default=0.0)
    p.add_argument("--temp-dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    node = _start_node(a.name, a.head, a.address, a.num_cpus, a.temp_dir)
    state_file = a.state_dir / f"{a.name}.json"
    state = {"name": a.name, "pid": os.getpid(), "node_id": node.node_id, "head": a.head,
             "address": node.gcs_address, "dashboard": f"http://{node.webui_url}" if a.head else None}
    stopping: list[str] = []
    signalled = threading.Event()  # set by the handler: no signal is lost between a check and a wait

    def on_signal(signum, _frame):
        stopping.append("preempted" if signum == signal.SIGTERM else "stopped")
        signalled.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _write_json(state_file, state)
    log.info("node %s (%s) up: %s", a.name, node.node_id[:12], state)
    while not signalled.wait(1.0):
        pass
    if stopping[0] == "preempted" and not a.head and a.grace_s > 0:
        log.info("node %s: SIGTERM, draining with a %.1f s deadline", a.name, a.grace_s)
        t = time.monotonic()
        try:
            drain(node.gcs_address, node.node_id, a.grace_s, f"SIGTERM to local node {a.name}")
        except Exception as e:  # the head may be gone: then there is no one to tell
            log.warning("node %s: could not drain: %s", a.name, e)
        time.sleep(max(0.0, a.grace_s - (time.monotonic() - t)))
    with contextlib.suppress(FileNotFoundError):
        state_file.unlink()
    node.kill_all_processes(check_alive=False, allow_graceful=False)
    _kill_the_rest_of_my_group()
    log.info("node %s: down (%s)", a.name, stopping[0])


def _kill_the_rest_of_my_group() -> None:
    """SIGKILL every other process of this node's process group: the
    raylet's agents are not among the processes ``kill_all_processes``
    knows, and left behind they lived ~60 s after the cluster went down, one
    of them spinning at half a core on the gone GCS (measured: 56 CPU-s in
    95 s). Only where this process leads a session of its own (LocalCluster
    starts each node so): its group then holds its own descendants alone."""
    me = os.getpid()
    if os.getsid(0) != me:  # started from a shell, whose job group may hold others (a `| tee`): leave it
        return
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pid != me and os.getpgid(pid) == me:
                os.kill(pid, signal.SIGKILL)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------- the cluster
@dataclass
class LocalCluster:
    """A head and worker nodes on this machine, as processes of ours.

    ``LocalCluster.start(state_dir, workers=2)`` returns once every node is
    up; ``address`` is the head's GCS address (``ray.init(address=...)``,
    ``saat-dist ... --address``), ``dashboard`` its job API. ``kill(name)``
    loses a node, ``preempt(name)`` sends it the preemption signal,
    ``add_node()`` brings capacity back, ``stop()`` stops every node it
    started (by process id)."""

    state_dir: Path
    cpus_per_node: float = 1.0
    grace_s: float = 30.0
    nodes: dict[str, dict] = field(default_factory=dict)  # name -> the node's state file
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, state_dir: Path, workers: int = 2, cpus_per_node: float = 1.0, grace_s: float = 30.0,
              timeout_s: float = 120.0) -> "LocalCluster":
        cluster = cls(Path(state_dir), cpus_per_node, grace_s)
        cluster.state_dir.mkdir(parents=True, exist_ok=True)
        # what nodes added later get (attach reads it)
        _write_json(cluster.state_dir / "settings.conf", {"cpus_per_node": cpus_per_node, "grace_s": grace_s})
        try:
            cluster._spawn("head", ["--head", "--num-cpus", "0"], timeout_s)
            for _ in range(workers):  # one at a time: raylets starting together can pick the same free port
                cluster.add_node(timeout_s=timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def attach(cls, state_dir: Path) -> "LocalCluster":
        """The cluster whose node processes wrote their state under ``state_dir``."""
        settings = Path(state_dir) / "settings.conf"
        cluster = cls(Path(state_dir), **(json.loads(settings.read_text()) if settings.is_file() else {}))
        for f in sorted(cluster.state_dir.glob("*.json")):
            cluster.nodes[f.stem] = json.loads(f.read_text())
        if "head" not in cluster.nodes:
            raise FileNotFoundError(f"{state_dir}: no running local cluster (no head.json)")
        return cluster

    @property
    def address(self) -> str:
        return self.nodes["head"]["address"]

    @property
    def dashboard(self) -> str:
        return self.nodes["head"]["dashboard"]

    @property
    def workers(self) -> list[str]:
        return sorted((n for n in self.nodes if n != "head"), key=lambda n: int(n.split("-")[1]))

    def add_node(self, wait: bool = True, timeout_s: float = 120.0) -> str:
        used = {int(n.split("-")[1]) for n in self.nodes if n != "head"} | {
            int(n.split("-")[1]) for n in self.procs if n != "head"}
        name = f"worker-{max(used, default=0) + 1}"
        self._spawn(name, ["--address", self.address, "--num-cpus", str(self.cpus_per_node),
                           "--grace-s", str(self.grace_s)], timeout_s if wait else None)
        if wait:
            self.wait_for_nodes(timeout_s, [name])
        return name

    def _spawn(self, name: str, args: list[str], timeout_s: float | None) -> None:
        state = self.state_dir / f"{name}.json"
        with contextlib.suppress(FileNotFoundError):
            state.unlink()
        log_file = open(self.state_dir / f"{name}.log", "ab")
        # "0": every process of the node (its agents, Ray's workers) takes 127.0.0.1 for this machine's address;
        # with "1" Ray turns a 127.0.0.1 address into the machine's outward one, where nothing listens: the
        # head's agent then hung connecting to the GCS at the first `ray job submit` (the job API never answered)
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "saat_dist.distributed.local_cluster", "--state-dir", str(self.state_dir.resolve()),
             "--name", name, *args], stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if timeout_s is not None:
            self._wait_state(name, timeout_s)

    def _wait_state(self, name: str, timeout_s: float) -> dict:
        path, deadline = self.state_dir / f"{name}.json", time.monotonic() + timeout_s
        while not path.is_file():
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"local Ray node {name} exited ({proc.returncode}); see {path.with_suffix('.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"local Ray node {name} not up after {timeout_s:.0f} s; see "
                                   f"{path.with_suffix('.log')}")
            time.sleep(0.2)
        self.nodes[name] = json.loads(path.read_text())
        return self.nodes[name]

    def wait_for_nodes(self, timeout_s: float = 120.0, names: list[str] | None = None) -> None:
        """Until the nodes ``names`` (default: every started node) wrote their
        state and Ray lists them alive. A node added while another drains
        waits for itself only: the drained one may be gone first (measured:
        a node that took 12 s to start against a 10 s grace)."""
        names = list(self.procs) if names is None else names
        for name in names:
            if name not in self.nodes:
                self._wait_state(name, timeout_s)
        want, deadline = {self.nodes[n]["node_id"] for n in names}, time.monotonic() + timeout_s
        while not want <= self.alive_node_ids():
            if time.monotonic() > deadline:
                missing = [n for n in names if self.nodes[n]["node_id"] not in self.alive_node_ids()]
                raise TimeoutError(f"Ray does not list node(s) {missing} alive after {timeout_s:.0f} s")
            time.sleep(0.2)

    def alive_node_ids(self) -> set[str]:
        import ray._raylet

        client = ray._raylet.GcsClient(address=self.address)
        return {n.node_id.hex() for n in client.get_all_node_info(timeout=10).values() if n.state == 0}

    def _pid(self, name: str) -> int:
        return self.nodes[name]["pid"]

    def kill(self, name: str) -> None:
        """Lose node ``name`` at once (SIGKILL: its reaper takes the raylet and workers)."""
        self._signal(name, signal.SIGKILL)
        self._forget(name)

    def preempt(self, name: str) -> None:
        """SIGTERM to node ``name``: it drains itself (deadline ``grace_s``) and goes down then."""
        self._signal(name, signal.SIGTERM)

    def wait_gone(self, name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while _alive(self._pid(name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"local Ray node {name} still up after {timeout_s:.0f} s")
            time.sleep(0.2)
        self._forget(name)

    def _signal(self, name: str, signum: int) -> None:
        if _ours(self._pid(name), self.state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid(name), signum)

    def _forget(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / f"{name}.json").unlink()
        self.nodes.pop(name, None)

    def restart(self, workers: int = 2, timeout_s: float = 120.0) -> None:
        """Everything down (the head with it: a head pod's restart), then a new
        head and ``workers`` nodes: a new cluster, the same state directory."""
        self.stop()
        fresh = LocalCluster.start(self.state_dir, workers, self.cpus_per_node, self.grace_s, timeout_s)
        self.nodes, self.procs = fresh.nodes, fresh.procs

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every node this cluster started (SIGINT: at once, no drain),
        workers and head together; SIGKILL for any still up after ``timeout_s``."""
        pids = {n: (self.nodes[n]["pid"] if n in self.nodes else self.procs[n].pid) for n in {*self.nodes, *self.procs}}
        pids = {n: p for n, p in pids.items() if _ours(p, self.state_dir)}
        for name in {*self.nodes, *self.procs} - set(pids):
            self._forget(name)  # gone already (its pid may belong to another process now)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name, pid in pids.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._forget(name)


def _ours(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is still a node process of this state directory (a
    recorded pid may have been reused by another process since)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"saat_dist.distributed.local_cluster" in argv and str(Path(state_dir).resolve()).encode() in argv


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a child that exited but was not yet waited for is a zombie: gone for us
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


# ---------------------------------------------------------------- commands
def command(args: argparse.Namespace) -> dict:
    """``saat-dist cluster up|status|add-node|preempt|kill|down`` on the
    cluster whose state lives in ``args.state_dir``; returns what to print."""
    d = Path(args.state_dir)
    if args.action == "up":
        up = [f.stem for f in sorted(d.glob("*.json")) if _ours(json.loads(f.read_text())["pid"], d)]
        if up:  # a head may be gone while its nodes run on: never leave those behind untracked
            raise RuntimeError(f"{d}: nodes {up} of a local cluster are still up (saat-dist cluster down "
                               f"--state-dir {d})")
        for stale in d.glob("*.json"):
            stale.unlink()
        cluster = LocalCluster.start(d, args.workers, args.cpus_per_node, args.grace_s)
    else:
        cluster = LocalCluster.attach(d)
        if args.action == "add-node":
            cluster.add_node()
        elif args.action in ("preempt", "kill"):
            if args.node not in cluster.workers:
                raise ValueError(f"--node {args.node!r}: not a worker node of {d} ({cluster.workers})")
            getattr(cluster, args.action)(args.node)
        elif args.action == "down":
            cluster.stop()
            return {"stopped": str(d)}
    return {"address": cluster.address, "dashboard": cluster.dashboard,
            "nodes": {n: {"node_id": s["node_id"], "pid": s["pid"]} for n, s in cluster.nodes.items()},
            "join": f"saat-dist run --address {cluster.address} ...  (or RAY_ADDRESS={cluster.address})"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "status", "add-node", "preempt", "kill", "down"],
                   help="up: a head and --workers nodes; preempt: SIGTERM to a node (it drains with its grace, then "
                        "goes); kill: SIGKILL to a node (lost); down: stop every node this state directory lists")
    p.add_argument("--state-dir", default="runs/local-cluster", help="where the node processes write their state and logs")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (up)")
    p.add_argument("--cpus-per-node", type=float, default=1.0, help="CPUs each worker node offers Ray (up)")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="a preempted node's drain deadline in seconds (up; a spot node's notice is 30-120 s)")
    p.add_argument("--node", help="worker node name for preempt/kill (e.g. worker-1)")


if __name__ == "__main__":
    node_main()
