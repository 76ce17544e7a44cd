"""The Ray Train worker function: one stage of a run on every worker.

The worker is handed the stage as a value (a training ``Stage`` or an
``EvaluationStage``) and runs it with ``runner.run_here``: training with a
DeepSpeed backend, checkpoints through ``ray.train.report`` (restored from
``ray.train.get_checkpoint()`` at start, so Ray's failure retries and
``--resume`` continue from the newest one) and Prometheus metrics;
evaluations with the queries and the database split over the workers.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from saat_dist.config import RunConfig, config_from_dict
from saat_dist.console import configure_logging, is_debug
from saat_dist.data.source import DataSource
from saat_dist.distributed.deepspeed_setup import DeepSpeedBackend
from saat_dist.distributed.preemption import report_keep_s
from saat_dist.distributed.ray_checkpoint import RayCheckpointer, checkpoint_stage
from saat_dist.monitoring.prometheus import WorkerMetrics
from saat_dist.runner import run_timed, stage_done
from saat_dist.training.trainer import Launch, Notice, this_process

log = logging.getLogger("saat_dist")
rank_log = logging.getLogger("saat_dist.rank")


def worker_main(config: dict) -> None:
    """One worker's part of the stage values in ``config["stages"]``, in
    order (a training stage and the evaluation of its model, or a whole
    ``run``: one worker group, one start). After a restart the stages before
    the one that wrote the restored checkpoint are skipped when their
    outputs are there (they had finished); a finished training stage
    restores its last checkpoint and only writes its model again."""
    import ray.train

    configure_logging()  # the driver's --log-level, from the job's environment
    _quiet_report_lines()
    cfg: RunConfig = config_from_dict(config["run"])
    stages = config["stages"]
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    if rank != 0:  # progress and results are logged once, by rank 0
        log.setLevel(logging.WARNING)
    run_dir = Path(cfg.output_dir)
    source = DataSource.open(cfg.data.shard_dir, cfg.data.base_url, cfg.data.verify_sha256)  # the manifest, read once

    def make_backend(model, optim, schedule):
        return DeepSpeedBackend(model, optim, cfg.distributed, schedule, world)

    where = {**this_process(), "node_id": ray.get_runtime_context().get_node_id(),
             "node_ip": ray.util.get_node_ip_address()}
    # where each rank runs is in train.json and the report; the console keeps to progress (--log-level debug)
    rank_log.debug("rank %d of %d on node %s (%s, pid %d)", rank, world, where["node_id"][:12], where["host"],
                  where["pid"])
    # no per-step barrier for notices nobody sends (distributed.preemption_notices off: no watcher)
    notice = preemption_notice if cfg.distributed.preemption_notices else None
    # after a restart, the stages before the one whose checkpoint Ray restores
    # had finished: skipped, when their outputs are there (a run directory
    # lost with its outputs, the storage path kept, runs them again)
    names = [s.name for s in stages]
    written_by = checkpoint_stage(ray.train.get_checkpoint())
    first = names.index(written_by) if written_by in names else 0
    skip = {s.name for s in stages[:first] if stage_done(s, run_dir)}
    if skip:
        log.info("restart: %s finished before the checkpoint of %s; going on from %s",
                 ", ".join(n for n in names if n in skip), written_by,
                 next(n for n in names if n not in skip))
    for i, stage in enumerate(stages):
        if stage.name in skip:
            continue
        metrics = WorkerMetrics(rank, stage.name)
        if cfg.metrics.enabled:
            port = metrics.serve(cfg.metrics.bind, cfg.metrics.port, run_dir, local_rank)
            # Prometheus finds it through the target file under <run_dir>/metrics
            rank_log.debug("rank %d (pid %d) serves metrics on %s:%d", rank, os.getpid(), cfg.metrics.bind, port)
        try:
            run_timed(cfg, stage, run_dir, Launch(rank, world, _device(cfg), make_backend,
                                                  RayCheckpointer(stage.name, rank), metrics, where, notice), source)
        finally:
            linger = cfg.metrics.linger_s if cfg.metrics.enabled else 0.0
            if i + 1 < len(stages):  # the next stage starts now; this endpoint lingers for Prometheus meanwhile
                threading.Thread(target=metrics.close, args=(linger,), daemon=True).start()
            else:
                metrics.close(linger)


def _quiet_report_lines() -> None:
    """Ray Train logs every report of every rank ("Reporting training result
    N: TrainingReport(...)") on a logger named after its file's path, outside
    the ``ray.train`` loggers its LoggingConfig quiets: that one too, unless
    the run's level is debug."""
    try:  # a private module of Ray 2.60: another Ray version may not have it, and then nothing is quieted
        import ray.train.v2._internal.execution.context as context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.DEBUG if is_debug() else logging.WARNING)


def preemption_notice() -> Notice | None:
    """Ray Train's preemption notice, agreed by every worker (a barrier): a
    node of this worker group is draining (a spot reclaim, a Kubernetes pod's
    preStop hook, ``ray drain-node``) and will be gone at its deadline."""
    import time

    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return None
    nodes = ", ".join(n[:12] for n in info.preempted_node_to_ranks)
    ranks = sorted(r for v in info.preempted_node_to_ranks.values() for r in v)
    deadline = info.deadline_ms / 1000 if info.deadline_ms else None
    left = f", {deadline - time.time():.1f} s before its deadline" if deadline else ""
    return Notice(f"preemption notice for node(s) {nodes} (ranks {ranks}){left}", deadline, report_keep_s())


def _device(cfg: RunConfig) -> torch.device:
    if cfg.distributed.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")
