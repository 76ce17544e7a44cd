"""Runs one stage in the calling process: a training ``Stage`` (the one
training loop) or an ``EvaluationStage`` (the one evaluation pipeline). The
in-process launcher (``pipeline.launch``) and every Ray worker
(``distributed.worker``) call this with the stage value they were given."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from saat_dist.checkpoint import write_text_atomic
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.evaluation import EvaluationStage, evaluate_stage
from saat_dist.evaluation.certify_stage import CertifyStage, certify_stage
from saat_dist.monitoring.tracking import evaluation_scalars, open_tracker
from saat_dist.stages import Stage
from saat_dist.training.trainer import Launch, train_stage


def stage_done(stage: Stage | EvaluationStage, run_dir: Path) -> bool:
    """Whether ``stage`` left its outputs in ``run_dir``: a training stage its
    model file, an evaluation its results in the current format (what
    ``--resume`` and a restarted worker group skip)."""
    from saat_dist.evaluation.results import results_current

    if isinstance(stage, Stage):
        return (Path(run_dir) / stage.out / "model.pt").is_file()
    if isinstance(stage, EvaluationStage):
        return results_current(Path(run_dir) / stage.folder / stage.results)
    return False  # anything else runs again


def record_stage(run_dir: Path, stage: str, seconds: float, add: bool = False) -> None:
    """Write a stage's wall time into ``<run_dir>/stages.json`` (``add``: to
    the time already there, as each attempt of a restarted stage does)."""
    path = Path(run_dir) / "stages.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[stage] = round(seconds + (times.get(stage, 0.0) if add else 0.0), 2)
    write_text_atomic(path, json.dumps(times, indent=1))


def clear_stages(run_dir: Path, stages: list[str]) -> None:
    """Forget the recorded times of ``stages`` (a launch about to run them again)."""
    path = Path(run_dir) / "stages.json"
    if path.is_file():
        times = json.loads(path.read_text())
        write_text_atomic(path, json.dumps({k: v for k, v in times.items() if k not in stages}, indent=1))


def run_timed(cfg: RunConfig, stage: Stage | EvaluationStage, run_dir: Path, launch: Launch, source: DataSource):
    """``run_here``, its wall time recorded by rank 0 (the stages of a chain
    run in one launch: each gets its own time) and its scalars tracked
    (``monitoring.tracking``: TensorBoard, MLflow; rank 0 only)."""
    t = time.monotonic()
    with open_tracker(cfg, stage.name, run_dir, launch.rank) as tracker:
        out = run_here(cfg, stage, run_dir, replace(launch, tracker=tracker), source)
        if isinstance(stage, EvaluationStage) and out is not None:  # rank 0 holds the results
            tracker.log(evaluation_scalars(out), 0)
    if launch.rank == 0:  # added up: a stage restarted in the same launch counts every attempt
        record_stage(run_dir, stage.name, time.monotonic() - t, add=True)
    return out


def run_here(cfg: RunConfig, stage: Stage | EvaluationStage, run_dir: Path, launch: Launch, source: DataSource):
    """Run ``stage`` on this process's part (rank ``launch.rank`` of ``launch.world``)."""
    if isinstance(stage, EvaluationStage):
        return evaluate_stage(cfg, stage, run_dir, launch.place, source, launch.where)
    if isinstance(stage, CertifyStage):
        return certify_stage(cfg, stage, run_dir, launch.place, source, launch.where)
    return train_stage(cfg, stage, run_dir, launch, source)
