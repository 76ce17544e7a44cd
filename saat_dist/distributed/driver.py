"""The driver: starts (or joins) Ray and runs one stage (or a chain of them)
as a Ray Train job.

Each stage or chain is a ``TorchTrainer`` whose ScalingConfig (workers, CPU/GPU,
resources per worker) and RunConfig (storage path, failure and checkpoint
config) come from ``cfg.distributed``. Ray Train runs are named
``<name>-<job>-<run dir key>-<timestamp>`` (the job: the stage, or ``run``
for a whole ``saat-dist run``) and recorded in ``<run_dir>/ray_runs.json``;
``resume=True`` reuses the recorded run of the job (or, that file gone, the
newest run of this run directory under the storage path that has a
checkpoint), so Ray restores its newest complete checkpoint and the workers
continue from it (``distributed.ray_checkpoint``: the stage that wrote it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from saat_dist.checkpoint import write_text_atomic
from saat_dist.console import LEVEL_ENV, log_level
from saat_dist.config import RunConfig

log = logging.getLogger("saat_dist")

# Keep Train's rendezvous on the node address Ray was given (loopback locally).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    d = cfg.distributed
    env = job_env(cfg)
    address = d.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit` jobs
    if address:
        # configure_logging=False: Ray's loggers keep this process's level (--log-level)
        ray.init(address=address, runtime_env={"env_vars": env}, configure_logging=False)
        return
    # A local Ray on loopback; its dashboard (which Ray Train's state queries
    # need) binds to 127.0.0.1 only: nothing listens beyond this machine.
    ray.init(num_cpus=d.local_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": env}, configure_logging=False)


def job_env(cfg: RunConfig) -> dict[str, str]:
    """Environment of every process of the job: workers, Ray Train's controller
    and its preemption watcher."""
    d = cfg.distributed
    return {"DS_ACCELERATOR": "cuda" if d.use_gpu else "cpu",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": str(d.preemption_poll_s),
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(d.worker_start_timeout_s),
            # no watcher actor unless notices are acted on (its start logs an
            # "E ... core_worker.cc" line about its arguments, ray#53727)
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1" if d.preemption_notices else "0",
            LEVEL_ENV: log_level()}


def _run_name(cfg: RunConfig, stage: str, run_dir: Path, resume: bool) -> str:
    """The Ray Train run name of ``stage``: with ``resume``, the one recorded in
    ``<run_dir>/ray_runs.json``, else the newest of this run's name under the
    storage path that holds a checkpoint (a head whose disk went with it
    finds its runs there); otherwise a new one, recorded."""
    path = run_dir / "ray_runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else {}
    if resume and runs.get(stage):
        return runs[stage]
    # the run directory's key in the name: runs of other directories (an
    # experiment's other cells) under the same storage path are never taken
    prefix = f"{cfg.name}-{stage}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}-"
    if resume:
        found = newest_run_with_checkpoint(storage_path(cfg), prefix)
        if found:
            log.info("resume: %s has no %s run recorded; continuing %s found under %s", path, stage, found,
                     storage_path(cfg))
            runs[stage] = found
            write_text_atomic(path, json.dumps(runs, indent=1))
            return found
        log.info("resume: no earlier %s run in %s or under %s, starting fresh", stage, path, storage_path(cfg))
    name = f"{prefix}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"  # UTC: ordered across hosts and DST
    runs[stage] = name
    write_text_atomic(path, json.dumps(runs, indent=1))
    return name


def newest_run_with_checkpoint(storage: str, prefix: str) -> str | None:
    """The newest Ray Train run ``<prefix><timestamp>`` under ``storage`` (a
    path or a pyarrow URI such as s3://bucket/dir) with a ``checkpoint_*``
    folder in it. Ray restores that run's newest complete checkpoint."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(), storage)
    try:
        runs = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        log.warning("resume: cannot list %s (%s)", storage, e)
        return None
    names = sorted((i.base_name for i in runs if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith(prefix)), reverse=True)
    for name in names:
        inside = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{name}", allow_not_found=True))
        if any(i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in inside):
            return name
    return None


def storage_path(cfg: RunConfig) -> str:
    sp = cfg.distributed.storage_path or str(Path(cfg.output_dir) / "ray")
    return sp if "://" in sp else str(Path(sp).resolve())


def _absolute_paths(cfg: RunConfig, run_dir: Path) -> dict:
    """The config as sent to workers, local paths made absolute (workers may run elsewhere)."""
    tree = cfg.to_dict()
    tree["output_dir"] = str(run_dir.resolve())
    if "://" not in tree["data"]["shard_dir"] and not tree["data"]["shard_dir"].startswith("pipe:"):
        tree["data"]["shard_dir"] = str(Path(tree["data"]["shard_dir"]).resolve())
    return tree


# One process group for CPU and CUDA tensors: the code bank's statistics,
# evaluation gathers and checkpoint collectives run on CPU tensors (gloo)
# while DeepSpeed's gradient all-reduce runs on CUDA tensors (NCCL). A plain
# "nccl" group (Ray's default with use_gpu) would fail on the first CPU one.
GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


def process_group_backend(cfg: RunConfig) -> str:
    return GPU_BACKEND if cfg.distributed.use_gpu else CPU_BACKEND


def build_trainer(cfg: RunConfig, stage, run_dir: Path, resume: bool = False, job: str | None = None):
    """The TorchTrainer of a stage value (a training ``Stage`` or an
    ``EvaluationStage``) or of a chain of them (a tuple: run in order by one
    worker group; not started), its Ray run named after ``job`` (by default
    the first stage's name): scaling, storage, failure handling and the
    process-group backend all come from the config here."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from saat_dist.distributed.ray_trainer import ShardStreamTrainer
    from saat_dist.distributed.worker import worker_main

    d = cfg.distributed
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = d.gpus_per_worker
    stages = stage if isinstance(stage, tuple) else (stage,)
    key = job or stages[0].name
    return ShardStreamTrainer(
        worker_main,
        train_loop_config={"run": _absolute_paths(cfg, run_dir), "stages": stages},
        torch_config=TorchConfig(backend=process_group_backend(cfg)),
        scaling_config=ScalingConfig(num_workers=tuple(d.num_workers) if d.elastic else d.num_workers,
                                     use_gpu=d.use_gpu, resources_per_worker=resources,
                                     placement_strategy=d.placement_strategy,
                                     elastic_resize_monitor_interval_s=d.elastic_resize_s),
        run_config=RayRunConfig(
            name=_run_name(cfg, key, run_dir, resume),
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=d.max_failures, max_preemption_failures=d.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=d.num_to_keep),
            # Ray Train's own lines (resource requests, group starts, every
            # report and checkpoint) on the console only at --log-level debug;
            # its log files under the Ray session keep every level
            logging_config=LoggingConfig(log_level="DEBUG" if log_level() == "debug" else "WARNING"),
            worker_runtime_env={"env_vars": {**job_env(cfg), "PYTHONUNBUFFERED": "1"}},
        ),
    )


class StageFailed(RuntimeError):
    """A stage failed on the Ray workers; ``str()`` is one line: the stage,
    the first failing rank and that worker's own error. ``bad_input`` when
    that error was one of the project's input errors (shard, manifest,
    checkpoint, config)."""

    def __init__(self, message: str, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input


BAD_INPUT_ERRORS = ("ShardError", "ShardDigestError", "ManifestError", "CheckpointError", "ConfigError",
                    "DataFormatError")


def _root_error(exc: BaseException) -> BaseException:
    """The innermost cause of a worker's exception (Ray wraps the user's)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text.strip()


def describe_failure(key: str, error: BaseException) -> StageFailed:
    failures = getattr(error, "worker_failures", None)
    if failures:
        described = []
        for rank, exc in failures.items():
            root = _root_error(exc)
            name = type(root).__name__
            text = _last_line(str(root))
            if name not in text.split(":", 1)[0]:
                text = f"{name}: {text}"
            bad = any(b in text.split(":", 1)[0] or b == name for b in BAD_INPUT_ERRORS)
            described.append((not bad, rank, text, bad))
        # the cause, not its echo: a rank with an input error before ranks that
        # failed because a peer died (closed connections), then the lowest rank
        _, rank, text, bad = min(described)
        return StageFailed(f"{key} failed on the Ray workers (rank {rank} of {len(failures)} failing): {text}", bad)
    root = _root_error(getattr(error, "controller_failure", error))
    return StageFailed(f"{key} failed in Ray Train: {type(root).__name__}: {_last_line(str(root))}", False)


def run_stage(cfg: RunConfig, stage, run_dir: Path, resume: bool = False, job: str | None = None):
    """Run ``stage`` (a training ``Stage`` or an ``EvaluationStage``, or a
    chain of them) on Ray workers as the Ray run ``job`` (``build_trainer``);
    returns Ray's Result.
    A failure raises ``StageFailed`` with one line naming the worker's error
    (Ray has retried ``distributed.max_failures`` times from the newest checkpoint)."""
    from ray.train import TrainingFailedError

    init_ray(cfg)
    key = "+".join(s.name for s in (stage if isinstance(stage, tuple) else (stage,)))
    try:
        result = build_trainer(cfg, stage, run_dir, resume, job).fit()
    except TrainingFailedError as e:
        raise describe_failure(key, e) from e
    if result.error is not None:
        raise describe_failure(key, result.error) from result.error
    return result
