"""The whole protocol on 2 Ray workers through the CLI on the tiny config;
the stages alone; and that run's SAAT stage again with one worker and then
the driver SIGKILLed, resumed to the uninterrupted run's parameters."""

import contextlib
import json
import os
import shutil
import signal
import time

import pytest
import torch

from saat_dist.cli import main
from tests.test_failures import _killed_at_exit, _wait_for, max_diff, params

REPORT_KEYS = {"random_map", "benign", "saat", "stage_seconds", "plots"}
STAGE_KEYS = {"clean_map", "attacked_map", "targeted_tmap", "theory_map", "theory_tmap", "pr_curve",
              "precision_at", "perceptibility"}


# SAAT long enough (72 steps, a checkpoint every 3) for the failure test to
# kill a worker and then the driver of the same stage mid-run; failures retried.
SAAT_OVERRIDES = ["saat.epochs=6", "saat.batch_size=16", "distributed.checkpoint_every=3",
                  "distributed.max_failures=2"]


def _args(run, shards) -> list[str]:
    sets = [f"output_dir={run}", f"data.shard_dir={shards}", *SAAT_OVERRIDES]
    return ["--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_address):
    tmp = tmp_path_factory.mktemp("tiny_run")
    args = _args(tmp / "run", tmp / "data" / "shards")
    assert main(["run", *args]) == 0
    return tmp, args


@pytest.mark.slow
def test_run_writes_a_complete_report(tiny_run):
    tmp, _ = tiny_run
    run = tmp / "run"
    report = json.loads((run / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    for stage in ("benign", "saat"):
        assert STAGE_KEYS <= set(report[stage])
        for key in ("clean_map", "attacked_map", "targeted_tmap"):
            assert 0 <= report[stage][key] <= 1
        assert report[stage]["perceptibility"]["linf"] <= 16 / 255 + 1e-6
    assert "attacked_map_strong" in report["saat"] and report["saat"]["strong_check"]["queries"] == 8
    assert 0 < report["random_map"] < 1
    assert set(report["stage_seconds"]) >= {"train", "evaluate_benign", "saat", "evaluate_saat", "total"}
    for png in report["plots"]:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "| clean mAP |" in md and "plots/pr_curves.png" in md
    assert (run / "config.yaml").is_file()
    # the demo data set was built on first use, through `data convert`
    assert (tmp / "data" / "list" / "train_img.txt").is_file()
    assert (tmp / "data" / "shards" / "manifest.json").is_file()


@pytest.mark.slow
def test_checkpoints_are_state_dicts(tiny_run):
    import torch

    tmp, _ = tiny_run
    state = torch.load(tmp / "run" / "saat" / "model.pt", weights_only=True)
    assert state["format"] == "saat-dist-model/1" and state["bits"] == 16
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert set(state) == {"format", "backbone", "bits", "model", "steps"}  # a model file holds the model only
    # Ray Train checkpoints: DeepSpeed state + each rank's train state (bank codes are +-1 after SAAT)
    (ckpt,) = sorted(p for p in (tmp / "run" / "ray").glob("*-saat-*/checkpoint_*") if p.is_dir())[-1:]
    for rank in (0, 1):
        train_state = torch.load(ckpt / f"rank-{rank}.pt", weights_only=True)
        assert set(train_state["bank"]["bank"]["codes"].unique().tolist()) <= {-1.0, 1.0}
        assert train_state["step"] == state["steps"]


@pytest.mark.slow
def test_stages_run_alone_from_the_run_directory(tiny_run):
    """`evaluate` then `report` on the finished run, here in this process
    (one rank, one thread as a Ray worker) instead of 2 Ray workers: the same
    seed and model give the same numbers at any worker count (1e-6; measured 0.0)."""
    tmp, args = tiny_run
    run = tmp / "run"
    before = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["evaluate", "--which", "benign", *args, "--set", "distributed.num_workers=0"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["report", *args]) == 0
    after = json.loads((run / "report.json").read_text())
    for key in ("clean_map", "attacked_map", "targeted_tmap"):
        assert after["benign"][key] == pytest.approx(before["benign"][key], abs=1e-6), key


def test_report_needs_evaluations(tmp_path, capsys):
    assert main(["report", "--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}"]) == 2
    assert "run the 'benign' evaluation" in capsys.readouterr().err


@pytest.mark.slow
def test_data_commands(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--train", "24", "--query", "8",
                 "--database", "24", "--shard-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"train": 24, "test": 8, "database": 24}
    assert main(["data", "convert", "--root", str(tmp_path / "d" / "list"), "--out", str(tmp_path / "s"),
                 "--shard-size", "5", "--shard-multiple", "2"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train"] == {"count": 24, "shards": 6}
    # a list-format error is a clean exit 2 naming the file and line
    lbl = tmp_path / "d" / "list" / "train_label.txt"
    lines = lbl.read_text().splitlines()
    lines[3] = lines[3] + " 0"
    lbl.write_text("\n".join(lines) + "\n")
    assert main(["data", "convert", "--root", str(tmp_path / "d" / "list"), "--out", str(tmp_path / "s2")]) == 2
    assert "train_label.txt:4: 11 label values, expected 10" in capsys.readouterr().err


@pytest.mark.slow
def test_single_process_run_without_ray(tmp_path, tiny_demo):
    """distributed.num_workers=0: every stage in this process (debugging path)."""
    run = tmp_path / "run"
    assert main(["run", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={tiny_demo[1]['shard_dir']}", "--set", "distributed.num_workers=0",
                 "--set", "train.epochs=1", "--set", "saat.epochs=1"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0 <= report["saat"]["attacked_map"] <= 1
    assert not (run / "ray").exists()


@pytest.mark.slow
def test_a_killed_worker_then_a_killed_driver_on_ray(tiny_run, tmp_path, ray_address):
    """The run's SAAT stage again, from its benign model, with a spawned driver:
    SIGKILL one worker by PID after two checkpoints (Ray restarts the group,
    both ranks restore the newest checkpoint), then SIGKILL the driver and
    its workers; `saat --resume` finishes from the newest checkpoint and ends
    where the uninterrupted run ended (1e-6; measured 0.0). Last in this
    module: a killed driver leaves Ray Train's bookkeeping behind it."""
    from saat_dist.monitoring.prometheus import read_target_file

    tmp, _ = tiny_run
    run = tmp_path / "killed"
    args = _args(run, tmp / "data" / "shards")
    (run / "benign").mkdir(parents=True)
    shutil.copy(tmp / "run" / "benign" / "model.pt", run / "benign" / "model.pt")
    ckpts = lambda: sorted(p for p in (run / "ray").glob("*-saat-*/checkpoint_*") if p.is_dir())  # noqa: E731

    def pid(rank: int) -> int | None:  # a worker removes its target file when it stops
        with contextlib.suppress(FileNotFoundError):
            return read_target_file(run / "metrics" / f"saat-rank{rank}.json")["pid"]

    ended = lambda: (run / "saat" / "model.pt").exists()  # noqa: E731
    # Ray's controller registers a reported checkpoint when it next polls the
    # workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 0.5 s in the tests)
    registered = 1.0
    with _killed_at_exit(["saat", "--address", ray_address, *args], tmp_path / "killed.log") as proc:
        _wait_for(lambda: len(ckpts()) >= 2 or ended() or proc.poll() is not None, 300, "two SAAT checkpoints")
        time.sleep(registered)
        assert not ended() and proc.poll() is None, "the stage ended before the kill; make it longer"
        before = {r: pid(r) for r in (0, 1)}
        newest = max(p.name for p in ckpts())  # Ray keeps the newest few: names carry the time
        os.kill(before[1], signal.SIGKILL)
        # a new worker group: both ranks serve their metrics from new processes
        _wait_for(lambda: all(pid(r) not in (None, before[r]) for r in (0, 1)) or proc.poll() is not None, 300,
                  "a new worker group after the worker's death")
        _wait_for(lambda: max(p.name for p in ckpts()) > newest or ended() or proc.poll() is not None, 300,
                  "a checkpoint after the restart")
        # the new group restored the checkpoint: its first one is not a fresh start's first (step 3)
        first = min(p for p in ckpts() if p.name > newest)
        assert _wait_for(lambda: _step(first), 60, "the first checkpoint after the restart") > 3
        time.sleep(registered)
        assert not ended() and proc.poll() is None, "the stage ended before the driver was killed; make it longer"
        workers = [pid(r) for r in (0, 1)]
    # The driver is gone (SIGKILL, leaving the block). Ray reaps the workers
    # it owned some seconds later, time in which they could end the stage:
    # they go now, as when the driver's node goes down.
    for worker in filter(None, workers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    assert not ended()
    assert main(["saat", "--resume", *args]) == 0  # a new driver, here (it joins the module's Ray)
    train = json.loads((run / "saat" / "train.json").read_text())
    assert 0 < train["resumed_from_step"] < train["steps"]  # it went on from a checkpoint
    assert max_diff(params(tmp / "run"), params(run)) <= 1e-6


def _step(checkpoint) -> int | None:
    """The step of a Ray checkpoint of this run, once rank 0's state is in it."""
    from saat_dist.checkpoint import load_state

    try:
        return load_state(checkpoint / "rank-0.pt")["step"]
    except Exception:  # not written yet (or already rotated away: then the wait times out)
        return None
