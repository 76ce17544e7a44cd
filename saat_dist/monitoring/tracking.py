"""Experiment tracking: a stage's scalars into TensorBoard event files and,
optionally, an MLflow run (through Ray Train's ``setup_mlflow``).

The training loop and the evaluation only call ``Tracker.log(values, step)``;
which libraries receive the values is decided here, once per stage, by
``open_tracker``. Only rank 0 tracks (every other rank gets the no-op
``Tracker``), so a run of W workers writes one set of files.

Layout and tags (the same for every stage, so TensorBoard overlays the
stages' curves when pointed at ``<run_dir>/tensorboard``):

  <run_dir>/tensorboard/<stage>/events.out.tfevents.*   one folder per stage
  step/<part>          loss parts and bits_flipped at each log step (the
                       means of train.json's ``log``); step/lr (the lr after
                       that step: the next step's); step/samples_per_s (over
                       every rank, since the previous log step)
  epoch/<part>         train.json's ``history``, at step = epoch (1-based)
  eval/clean_map, eval/map/<attack>, eval/tmap/<attack>, eval/worst_case_map,
  eval/clean_tmap      an evaluation's results, at step 0

MLflow (``tracking.mlflow_tracking_uri``): one MLflow run per stage, named
``<cfg.name>/<stage>`` in experiment ``tracking.mlflow_experiment``, with the
flattened config as its parameters and the same metrics as TensorBoard. A
``file:`` URI is a local file store (MLflow 3 keeps it in maintenance mode:
``MLFLOW_ALLOW_FILE_STORE=true`` is set for it); a server's ``http(s):`` URI
is what a multi-node cluster needs (rank 0's node alone sees its files).
"""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

MLFLOW_PIN = "mlflow-skinny==3.18.0"  # the lightest MLflow with the tracking client and file stores


def mlflow_problem(uri: str | None) -> str | None:
    """Why MLflow tracking to ``uri`` cannot start in this environment (MLflow
    is not installed), or None: for a config check, before any worker starts."""
    if uri and importlib.util.find_spec("mlflow") is None:
        return (f"{uri!r} is set but MLflow is not installed (pip install 'saat-dist[mlflow]', {MLFLOW_PIN}; "
                "or leave the key unset)")
    return None


def check_tracking(cfg) -> None:
    """Fail before any worker starts when MLflow tracking is asked for and
    MLflow is not installed (a ``ConfigError`` naming the key)."""
    from saat_dist.config import ConfigError

    why = mlflow_problem(cfg.tracking.mlflow_tracking_uri)
    if why is not None:
        raise ConfigError(f"tracking.mlflow_tracking_uri: {why}")


class Tracker:
    """Where a stage's scalars go. This base drops them: tracking disabled,
    or a rank other than 0."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(failed=kind is not None)


class TensorBoardTracker(Tracker):
    def __init__(self, logdir: Path) -> None:
        from tensorboardX import SummaryWriter  # no TensorFlow, no tensorboard package needed

        self.writer = SummaryWriter(str(logdir), flush_secs=10)  # a live TensorBoard sees a step within 10 s

    def log(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run, started through Ray Train's integration (``setup_mlflow``:
    sets the tracking URI, creates the experiment if needed, starts the run and
    logs the config as its parameters)."""

    def __init__(self, cfg, stage: str, run_dir: Path, uri: str, experiment: str) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        if urlparse(uri).scheme in ("", "file"):  # a file store, named explicitly: MLflow 3 refuses one unless told
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = setup_mlflow(config=cfg.to_dict(), tracking_uri=uri, experiment_name=experiment,
                                   run_name=f"{cfg.name}/{stage}", create_experiment_if_not_exists=True,
                                   tags={"stage": stage, "run_dir": str(Path(run_dir).resolve())})

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, parts: list[Tracker]) -> None:
        self.parts = parts

    def log(self, values: Mapping[str, float], step: int) -> None:
        for p in self.parts:
            p.log(values, step)

    def close(self, failed: bool = False) -> None:
        for p in self.parts:
            p.close(failed)


def open_tracker(cfg, stage: str, run_dir: str | Path, rank: int) -> Tracker:
    """The tracker of one stage on this rank (close it, or use it as a context)."""
    s = cfg.tracking
    if rank != 0:
        return Tracker()
    parts: list[Tracker] = []
    if s.tensorboard:
        parts.append(TensorBoardTracker(Path(run_dir) / "tensorboard" / stage))
    if s.mlflow_tracking_uri:
        parts.append(MLflowTracker(cfg, stage, Path(run_dir), s.mlflow_tracking_uri, s.mlflow_experiment))
    return parts[0] if len(parts) == 1 else Trackers(parts) if parts else Tracker()


# ---------------------------------------------------------------- what is logged
def prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in values.items()}


def evaluation_scalars(res: Mapping) -> dict[str, float]:
    """The headline numbers of an evaluation's results (``evaluation.results``)."""
    out = {"eval/clean_map": res["clean_map"]}
    if "clean_tmap" in res:
        out["eval/clean_tmap"] = res["clean_tmap"]
    for name, row in res.get("attacks", {}).items():
        out[f"eval/map/{name}"] = row["map"]
        if row.get("tmap") is not None:
            out[f"eval/tmap/{name}"] = row["tmap"]
    if res.get("worst_case"):
        out["eval/worst_case_map"] = res["worst_case"]["map"]
    return out


def current_lr(stepper) -> float:
    """The lr now of a torch stepper's optimizer or a DeepSpeed engine's (first parameter group)."""
    return float(stepper.optimizer.param_groups[0]["lr"])


# ---------------------------------------------------------------- reading back
def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``logdir`` (in file order): tag ->
    [(step, value)]. Reads the TFRecord framing directly (length, its CRC,
    the event, its CRC), so no TensorFlow or tensorboard package is needed."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out
