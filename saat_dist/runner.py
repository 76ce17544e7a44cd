"""Runs one stage in the calling process: a training ``Stage`` (the one
training loop) or an ``EvaluationStage`` (the one evaluation pipeline). The
in-process launcher (``pipeline.launch``) and every Ray worker
(``distributed.worker``) call this with the stage value they were given."""

from __future__ import annotations

from pathlib import Path

from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.evaluation import EvaluationStage, evaluate_stage
from saat_dist.stages import Stage
from saat_dist.training.trainer import Launch, train_stage


def run_here(cfg: RunConfig, stage: Stage | EvaluationStage, run_dir: Path, launch: Launch, source: DataSource):
    """Run ``stage`` on this process's part (rank ``launch.rank`` of ``launch.world``)."""
    if isinstance(stage, EvaluationStage):
        return evaluate_stage(cfg, stage, run_dir, launch.place, source, launch.where)
    return train_stage(cfg, stage, run_dir, launch, source)
