"""The SAAT protocol end to end, one stage at a time.

prepare -> train (benign) -> evaluate benign -> saat -> evaluate saat -> report.
Every stage reads the previous stage's files from the run directory, so each
also runs alone (``saat-dist train | saat | evaluate | report``). Every
stage is a value (a training ``Stage`` or an ``EvaluationStage``) that
``launch`` runs, alone or chained (``run`` launches a training stage and the
evaluation of its model together): a Ray Train job with
``distributed.num_workers >= 1`` (the default), this process with 0; both
run each stage through ``runner.run_here``.

Run directory layout:
  config.yaml               the resolved configuration
  benign/model.pt           benign model (state_dict)
  benign/train.json         per-epoch history, log records, parameter digests
  benign/eval.json          its evaluation (the evaluation pipeline's one results format)
  benign/checkpoints/step-N in-process checkpoints (Ray keeps its own under ray/)
  saat/...                  the same for the SAAT model
  stages.json               wall time of each stage
  report.json, report.md, plots/*.png
  metrics/<stage>-rank<r>.json  where each worker serves Prometheus metrics
  tensorboard/<stage>/      TensorBoard event files of each stage (rank 0; monitoring.tracking)
  ray/, ray_runs.json       Ray Train storage (checkpoints) and run names
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from saat_dist.config import RunConfig, save_config
from saat_dist.runner import clear_stages, record_stage, stage_done
from saat_dist.data.demo import DemoSpec, build_demo
from saat_dist.data.shards import MANIFEST
from saat_dist.data.source import DataSource
from saat_dist.device import select_device
from saat_dist.evaluation.plan import RUN_RESULTS, EvaluationStage
from saat_dist.stages import SAAT, TRAIN, Stage

log = logging.getLogger("saat_dist")


def ensure_data(cfg: RunConfig) -> DataSource:
    """The data source (manifest read once); builds the demo data set first when asked and missing."""
    if cfg.data.base_url:  # shards and manifest are served elsewhere; nothing to build
        return DataSource.open(cfg.data.shard_dir, cfg.data.base_url, cfg.data.verify_sha256)
    shard_dir = Path(cfg.data.shard_dir)
    if cfg.data.build_demo:
        d = cfg.data.demo
        spec = DemoSpec(train=d.train, query=d.query, database=d.database, min_digits=d.min_digits,
                        max_digits=d.max_digits, grid=d.grid, seed=d.seed, shard_size=d.shard_size,
                        colour=d.colour, clutter=d.clutter)
        if not (shard_dir / MANIFEST).is_file():
            if shard_dir.name != "shards":
                raise ValueError(f"data.shard_dir: the demo is built as <dir>/shards, got {shard_dir}")
            log.info("building the embedded demo data set under %s", shard_dir.parent)
            summary = build_demo(shard_dir.parent, spec)
            log.info("demo data: %s, relevance fraction %.3f", summary["counts"], summary["relevance_fraction"])
        else:
            _check_demo_spec(shard_dir.parent / "demo.json", spec)
    return DataSource.open(str(shard_dir), verify=cfg.data.verify_sha256)


def _check_demo_spec(path: Path, spec: DemoSpec) -> None:
    """A demo data set built with other parameters is used as it is, but not silently."""
    if not path.is_file():
        return  # shards from elsewhere (data convert): nothing to compare
    built = json.loads(path.read_text()).get("spec", {})
    for key, value in asdict(spec).items():
        if key in built and built[key] != value:
            log.warning("data.demo.%s: %s was built with %s=%r, the config asks for %r; using the data as built "
                        "(point data.shard_dir elsewhere to build the configured one)", key, path.parent / "shards",
                        key, built[key], value)


def check_layout(cfg: RunConfig, source: DataSource, stages: list[Stage]) -> None:
    """Fail before any worker starts when a training stage's global batch or
    worker count does not fit the train split (a ``ConfigError`` naming the key)."""
    from saat_dist.config import ConfigError
    from saat_dist.data.stream import stream_layout_error

    for stage, workers in ((s, max(1, w)) for s in stages for w in cfg.distributed.worker_counts):
        tc = getattr(cfg, stage.section)
        why = stream_layout_error(source.count("train"), len(source.counts("train")), tc.batch_size,
                                  cfg.data.canonical_slots, workers, cfg.distributed.grad_accum)
        if why:
            key = "distributed.num_workers" if "canonical slots" in why else f"{stage.section}.batch_size"
            raise ConfigError(f"{key}: {why}")
        if stage.defence is not None and stage.defence.updates_per_step and cfg.distributed.grad_accum != 1:
            raise ConfigError(f"distributed.grad_accum: {stage.section} replays each batch as optimizer updates "
                              "and needs grad_accum 1 (a replay is an update, not a micro-batch)")


def _metrics_sink(cfg: RunConfig, stage: Stage | EvaluationStage, run_dir: Path):
    """An in-process training's metrics endpoint (evaluations record theirs in
    the results file), or a sink that drops them."""
    from saat_dist.monitoring.prometheus import WorkerMetrics
    from saat_dist.training.trainer import NullMetrics

    if not (cfg.metrics.enabled and isinstance(stage, Stage)):
        return NullMetrics()
    metrics = WorkerMetrics(0, stage.name)
    metrics.serve(cfg.metrics.bind, cfg.metrics.port, run_dir)
    return metrics


def launch(cfg: RunConfig, stage: Stage | EvaluationStage | tuple, run_dir: Path, resume: bool = False,
           source: DataSource | None = None, job: str | None = None) -> None:
    """Run one stage value, or a chain of them (a tuple, run in order by one
    worker group: a training stage and the evaluation of its model, or the
    whole ``run``, start one group, not several): the one in-process-or-Ray
    dispatch. ``job`` names the chain's Ray run (by default its first
    stage; ``--resume`` finds the run by it). With
    ``distributed.num_workers >= 1`` a Ray Train job (``distributed.driver``);
    with 0 this process, with a torch optimizer, local ``step-N`` checkpoints
    and (if enabled) a metrics endpoint. Either way ``runner.run_here`` runs
    each stage. Wall times go into stages.json: a chain's stages each their
    own (every attempt of a restarted one added up), the first with the
    job's start and restarts."""
    from saat_dist.monitoring.tracking import check_tracking
    from saat_dist.runner import run_timed

    check_tracking(cfg)  # a missing MLflow fails here, before any worker starts
    stages = stage if isinstance(stage, tuple) else (stage,)
    clear_stages(run_dir, [s.name for s in stages])  # each stage's attempts in this launch are added up
    t = time.monotonic()
    if not cfg.distributed.in_process:
        from saat_dist.distributed.driver import run_stage

        run_stage(cfg, stage, run_dir, resume, job)
    else:
        source = source or ensure_data(cfg)
        for one in stages:
            here = _in_process(cfg, one, run_dir, resume)
            try:
                run_timed(cfg, one, run_dir, here, source)
            finally:
                here.metrics.close(cfg.metrics.linger_s)
    times_path = run_dir / "stages.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    rest = sum(times.get(s.name, 0.0) for s in stages[1:]) if len(stages) > 1 else 0.0
    record_stage(run_dir, stages[0].name, time.monotonic() - t - rest)


def _in_process(cfg: RunConfig, stage: Stage | EvaluationStage, run_dir: Path, resume: bool):
    """The Launch of one stage in this process."""
    from saat_dist.training.backend import LocalBackend
    from saat_dist.training.checkpointing import LocalCheckpointer
    from saat_dist.training.trainer import Launch

    ckpt_root = run_dir / (stage.out if isinstance(stage, Stage) else stage.folder) / "checkpoints"
    if not resume and isinstance(stage, Stage):
        shutil.rmtree(ckpt_root, ignore_errors=True)  # a fresh training never picks up an older run's state
    return Launch(0, 1, select_device(cfg.device),
                  lambda model, optim, schedule: LocalBackend(model, optim, schedule, cfg.distributed.gradient_clipping),
                  LocalCheckpointer(ckpt_root, cfg.distributed.num_to_keep, resume), _metrics_sink(cfg, stage, run_dir))


def train(cfg: RunConfig, stage: Stage, run_dir: Path, resume: bool = False) -> None:
    """A training stage, after checking its input model and its batch layout."""
    source = ensure_data(cfg)
    check_layout(cfg, source, [stage])
    if stage.needs and not (run_dir / stage.needs / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir / stage.needs / 'model.pt'}: run the stage that writes it first")
    launch(cfg, stage, run_dir, resume, source)


def run_evaluation(cfg: RunConfig, which: str) -> EvaluationStage:
    """The run's evaluation of model folder ``which``: the mainstay attack (one
    run) and its targeted form, and on the SAAT model also the strong check
    (longer, with ``attack.strong_restarts`` restarts)."""
    attacks = ("mainstay", "mainstay_targeted", *(("mainstay_strong",) if which == SAAT.out else ()))
    return EvaluationStage(which, attacks, results=RUN_RESULTS, restarts=1)


def stage_train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> None:
    train(cfg, TRAIN, run_dir, resume)


def stage_saat(cfg: RunConfig, run_dir: Path, resume: bool = False) -> None:
    train(cfg, SAAT, run_dir, resume)


def stage_evaluate(cfg: RunConfig, run_dir: Path, which: str) -> dict:
    """Evaluate ``which`` ('benign' or 'saat'); the SAAT model also gets the strong attack."""
    source = ensure_data(cfg)
    if not (run_dir / which / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir / which / 'model.pt'}: train the {which} model first")
    stage = run_evaluation(cfg, which)
    launch(cfg, stage, run_dir, source=source)
    return json.loads((run_dir / which / stage.results).read_text())


MODEL_FILE_FOLDER = "model_file"  # the run-directory folder of `evaluate --model-file`


def evaluate_model_file(cfg: RunConfig, path: Path) -> dict:
    """``saat-dist evaluate --model-file``: a user's own state_dict, checked
    as untrusted input before any other work (``load_weights_file``), copied
    into ``<run_dir>/model_file/model.pt`` with its origin (source.json) and
    evaluated as the run evaluates a defended model (the strong check
    included); returns its results (eval.json there)."""
    from saat_dist.checkpoint import file_sha256, write_text_atomic
    from saat_dist.models.model_file import load_weights_file, save_model

    model = load_weights_file(cfg.model, cfg.seed, path, "cpu")
    source = ensure_data(cfg)
    run_dir = prepare_run_dir(cfg)
    folder = run_dir / MODEL_FILE_FOLDER
    save_model(cfg.model, folder / "model.pt", model.state_dict(), 0)
    write_text_atomic(folder / "source.json", json.dumps({"path": str(Path(path).resolve()),
                                                          "sha256": file_sha256(path)}, indent=1))
    stage = EvaluationStage(MODEL_FILE_FOLDER, ("mainstay", "mainstay_targeted", "mainstay_strong"),
                            results=RUN_RESULTS, restarts=1)
    launch(cfg, stage, run_dir, source=source)
    return json.loads((folder / stage.results).read_text())


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_all(cfg: RunConfig, resume: bool = False) -> dict:
    from saat_dist.evaluation.report import write_run_report

    t0 = time.monotonic()
    source = ensure_data(cfg)  # untrusted manifests are checked before anything is written
    check_layout(cfg, source, [TRAIN, SAAT])
    run_dir = prepare_run_dir(cfg)
    record_stage(run_dir, "data", time.monotonic() - t0)
    # One launch for the whole protocol: one Ray worker group (a group start
    # costs more than the tiny run's training). --resume skips stages whose
    # outputs exist and resumes the interrupted one: the Ray run is named
    # "run" whichever stage the chain starts at, so a head lost during SAAT
    # finds SAAT's checkpoints again.
    chain: tuple = ()
    for training, which in ((TRAIN, "benign"), (SAAT, "saat")):
        evaluation = run_evaluation(cfg, which)
        chain += (() if resume and stage_done(training, run_dir) else (training,)) + (
            () if resume and which == "benign" and stage_done(evaluation, run_dir) else (evaluation,))
    trained_here = {s.out for s in chain if isinstance(s, Stage)}
    for training in (s for s in chain if isinstance(s, Stage) and s.needs and s.needs not in trained_here):
        if not (run_dir / training.needs / "model.pt").is_file():
            raise FileNotFoundError(f"{run_dir / training.needs / 'model.pt'}: run the stage that writes it first")
    launch(cfg, chain, run_dir, resume, source, job="run")
    record_stage(run_dir, "total", time.monotonic() - t0)
    return write_run_report(cfg, run_dir)
