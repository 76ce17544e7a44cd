"""Experiment tracking (saat_dist.monitoring.tracking): the TensorBoard event
files and the MLflow run of each stage hold train.json's and eval.json's
numbers, rank 0 alone writes them, and a missing MLflow fails before any
work starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from saat_dist.config import ConfigError, load_config
from saat_dist.monitoring.tracking import check_tracking, read_scalars
from saat_dist.pipeline import launch, run_evaluation
from saat_dist.stages import SAAT, TRAIN
from saat_dist.training.optim import lr_multiplier


def tiny_cfg(run_dir: Path, shard_dir: str, *extra: str):
    sets = [f"output_dir={run_dir}", f"data.shard_dir={shard_dir}", "data.build_demo=false", "log_every_s=0",
            "distributed.num_workers=0", "metrics.enabled=false", "train.epochs=2", "saat.epochs=1", "saat.iters=1",
            *extra]
    return load_config("configs/tiny.yaml", sets)


@pytest.fixture(scope="module")
def tracked_run(tiny_demo, tmp_path_factory):
    """Benign training (2 epochs) and its model's evaluation, in-process, tracked (SAAT: when a test asks)."""
    run_dir = tmp_path_factory.mktemp("tracked")
    cfg = tiny_cfg(run_dir, tiny_demo[1]["shard_dir"], "eval.num_queries=8", "attack.iters=1")
    for stage in (TRAIN, run_evaluation(cfg, "benign")):
        launch(cfg, stage, run_dir)
    return cfg, run_dir


@pytest.mark.parametrize("stage, parts", [(TRAIN, {"loss", "hash"}),
                                          (SAAT, {"loss", "hash", "adv", "quant", "bits_flipped"})])
def test_a_training_stage_writes_train_json_numbers_to_tensorboard(tracked_run, stage, parts):
    cfg, run_dir = tracked_run
    if stage is SAAT:
        launch(cfg, SAAT, run_dir)  # from the benign model, 1 epoch (its lr drops at a milestone)
    train = json.loads((run_dir / stage.out / "train.json").read_text())
    scalars = read_scalars(run_dir / "tensorboard" / stage.name)
    assert set(scalars) == {f"epoch/{p}" for p in parts} | {f"step/{p}" for p in parts} | {
        "step/lr", "step/samples_per_s"}
    for p in parts:  # event files keep float32: equal to train.json's float64 at float32 precision
        assert [s for s, _ in scalars[f"epoch/{p}"]] == list(range(1, len(train["history"]) + 1))
        assert [v for _, v in scalars[f"epoch/{p}"]] == pytest.approx([h[p] for h in train["history"]], rel=1e-6)
        assert [s for s, _ in scalars[f"step/{p}"]] == [r["step"] for r in train["log"]]
        assert [v for _, v in scalars[f"step/{p}"]] == pytest.approx([r[p] for r in train["log"]], rel=1e-6)
    optim, plan = getattr(cfg, stage.section).optim, train["schedule"]
    lr_after = [plan["lr"] * lr_multiplier(optim, r["step"], plan["total_steps"], plan["steps_per_epoch"], 1.0)
                for r in train["log"]]  # the lr the next step uses (tiny: no lr scaling, factor 1)
    assert [v for _, v in scalars["step/lr"]] == pytest.approx(lr_after, rel=1e-6)
    assert all(v > 0 for _, v in scalars["step/samples_per_s"])
    assert len(train["history"]) == {"train": 2, "saat": 1}[stage.name]
    assert len(scalars["step/loss"]) == len(train["history"]) * 7  # log_every_s=0: every step of 240 // 32


def test_an_evaluation_writes_its_results_to_tensorboard(tracked_run):
    _, run_dir = tracked_run
    res = json.loads((run_dir / "benign" / "eval.json").read_text())
    scalars = read_scalars(run_dir / "tensorboard" / "evaluate_benign")
    expected = {"eval/clean_map": res["clean_map"], "eval/clean_tmap": res["clean_tmap"],
                "eval/map/mainstay": res["attacks"]["mainstay"]["map"],
                "eval/map/mainstay_targeted": res["attacks"]["mainstay_targeted"]["map"],
                "eval/tmap/mainstay_targeted": res["attacks"]["mainstay_targeted"]["tmap"],
                "eval/worst_case_map": res["worst_case"]["map"]}
    assert {tag: v for tag, [(step, v)] in scalars.items()} == pytest.approx(expected, rel=1e-6)
    assert {step for [(step, _)] in scalars.values()} == {0}


def test_tracking_off_writes_no_files(tiny_demo, tmp_path):
    cfg = tiny_cfg(tmp_path, tiny_demo[1]["shard_dir"], "train.epochs=1", "tracking.tensorboard=false")
    launch(cfg, TRAIN, tmp_path)
    assert (tmp_path / "benign" / "train.json").is_file()
    assert not (tmp_path / "tensorboard").exists()


def test_mlflow_file_store_gets_the_stage_run_with_config_and_metrics(tiny_demo, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true: the tracker sets it for a file: URI
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    cfg = tiny_cfg(tmp_path, tiny_demo[1]["shard_dir"], "train.epochs=2", "tracking.tensorboard=false",
                   f"tracking.mlflow_tracking_uri={uri}", "tracking.mlflow_experiment=tiny-tests")
    launch(cfg, TRAIN, tmp_path)
    train = json.loads((tmp_path / "benign" / "train.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert (run.info.run_name, run.info.status, run.data.tags["stage"]) == ("tiny/train", "FINISHED", "train")
    params = run.data.params
    assert (params["train/epochs"], params["train/optim/lr"], params["model/bits"]) == ("2", "0.003", "16")
    assert params["output_dir"] == str(tmp_path)
    for p in ("loss", "hash"):  # MLflow keeps float64: equal
        epochs = client.get_metric_history(run.info.run_id, f"epoch/{p}")
        assert [(m.step, m.value) for m in epochs] == [(i + 1, h[p]) for i, h in enumerate(train["history"])]
        steps = client.get_metric_history(run.info.run_id, f"step/{p}")
        assert [(m.step, m.value) for m in steps] == [(r["step"], r[p]) for r in train["log"]]
    assert not (tmp_path / "tensorboard").exists()


def test_mlflow_asked_for_but_not_installed_fails_before_any_work(tiny_demo, tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, tiny_demo[1]["shard_dir"], f"tracking.mlflow_tracking_uri={(tmp_path / 'm').as_uri()}")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without MLflow imports
    with pytest.raises(ConfigError, match=r"^tracking\.mlflow_tracking_uri: .* MLflow is not installed "
                                          r"\(pip install 'saat-dist\[mlflow\]', mlflow-skinny==[0-9.]+; or leave "
                                          r"the key unset\)$"):
        check_tracking(cfg)
    with pytest.raises(ConfigError, match="tracking.mlflow_tracking_uri"):
        launch(cfg, TRAIN, tmp_path)
    assert not list(tmp_path.iterdir())


# Rank 0 alone writes event files on Ray workers: tests/test_pipeline.py::test_run_writes_a_complete_report
