"""A node's preemption notice to Ray: "this node goes in N seconds".

Ray Train (2.60) watches Ray's draining nodes and tells the workers
(``ray.train.get_preemption_info``); the training loop then checkpoints at
once (``distributed.preemption_check_every``), trains on, checkpoints again
just before the node's deadline and waits (``training.trainer.PreemptionWatch``);
Ray Train stops the group at the deadline and restarts it from that last
checkpoint when capacity is back. What turns a cloud's or Kubernetes' notice into a
drain: a worker pod's preStop hook runs ``python -m
saat_dist.distributed.preemption --grace-s 25`` (cluster/base/rayjob.yaml),
and the local cluster's nodes drain themselves on SIGTERM
(``saat_dist.distributed.local_cluster``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping

PREEMPTION = "DRAIN_NODE_REASON_PREEMPTION"
# Ray Train's controller collects the workers' reports (their checkpoints)
# when it polls them, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray 2.60's
# names and default, checked against Ray's own in tests/test_failures.py;
# not imported from Ray's private module, which costs a second of import)
REPORT_POLL_ENV, REPORT_POLL_DEFAULT_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0


def report_keep_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long before its node goes a checkpoint must be reported for Ray
    Train to keep it: two of its controller's polls, one for a report still
    queued ahead of it (a worker holds one; an epoch-end checkpoint the step
    before) and one for its own. Closer than that it is on storage but never
    registered, and the restart restores an older one (measured: the
    deadline's checkpoint written 1.1 s before the deadline, the step after
    an epoch end's, at the 2 s default: 1 step redone)."""
    try:
        poll_s = float(environ.get(REPORT_POLL_ENV, REPORT_POLL_DEFAULT_S))
    except ValueError as e:
        raise ValueError(f"{REPORT_POLL_ENV}={environ[REPORT_POLL_ENV]!r} is not a number of seconds") from e
    return 2 * poll_s


def drain(address: str, node_id: str, deadline_s: float, why: str) -> None:
    """Tell Ray (the GCS at ``address``) that node ``node_id`` will be gone in
    ``deadline_s`` seconds, as ``ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION`` does. An idle node is removed at once; a
    busy one is marked draining until its deadline."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + int(deadline_s * 1000)
    accepted, why_not = ray._raylet.GcsClient(address=address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value(PREEMPTION), why, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray did not accept draining node {node_id}: {why_not}")


def this_node_id(address: str, node_ip: str) -> str:
    """The id of the live Ray node whose raylet listens on ``node_ip``."""
    import ray._raylet

    nodes = [n for n in ray._raylet.GcsClient(address=address).get_all_node_info(timeout=10).values()
             if n.state == 0 and n.node_manager_address == node_ip]
    if len(nodes) != 1:
        raise RuntimeError(f"{len(nodes)} live Ray nodes at {node_ip} (expected one): pass --node-id")
    return nodes[0].node_id.hex()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saat_dist.distributed.preemption",
                                description="drain this Ray node: a preemption notice with a deadline")
    p.add_argument("--grace-s", type=float, required=True, help="seconds until the node goes")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="GCS address (default: RAY_ADDRESS, else the cluster this machine's `ray start` joined)")
    p.add_argument("--node-ip", default=os.environ.get("MY_POD_IP"), help="this node's IP (default: MY_POD_IP)")
    p.add_argument("--node-id", help="the node's hex id (default: the live node at --node-ip)")
    p.add_argument("--wait", action="store_true",
                   help="return only when the deadline has passed (a preStop hook: Kubernetes sends SIGTERM, "
                        "which stops Ray at once, when the hook returns)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    address = a.address
    if not address:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        address = canonicalize_bootstrap_address_or_die(None)
    if not (a.node_id or a.node_ip):
        p.error("give --node-id or --node-ip (or set MY_POD_IP)")
    node_id = a.node_id or this_node_id(address, a.node_ip)
    t = time.monotonic()
    drain(address, node_id, a.grace_s, "preemption notice (saat_dist.distributed.preemption)")
    print(f"node {node_id} drains; Ray Train checkpoints and stops its workers within {a.grace_s:g} s", flush=True)
    if a.wait:
        time.sleep(max(0.0, a.grace_s - (time.monotonic() - t)))


if __name__ == "__main__":
    main()
